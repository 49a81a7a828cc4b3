"""Place a model by its plan at a large world size inside one process (a fake process group: shapes
and placements are real, collectives do nothing) and print what rank 0 holds, as JSON.

python tests/fake_world.py PRESET WORLD DP_REPLICATE DP_SHARD TP
"""

from __future__ import annotations

import math
import sys

import orjson
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from olmo_fn.graph import get_preset
from olmo_fn.graph.init import init_params
from olmo_fn.graph.param_tree import flatten
from olmo_fn.parallelize.mesh import build_mesh
from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.parallelize.plan import apply_plan, default_plan
from olmo_fn.state.adamw import init_adamw_state


def main() -> None:
    preset, world, *sizes = sys.argv[1:]
    shape = MeshShape(*map(int, sizes))
    assert shape.world == int(world)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=shape.world)
    model = get_preset(preset)
    mesh = build_mesh(shape, torch.device("cpu"))
    params = apply_plan(init_params(model, device="meta"), default_plan(model, shape), mesh)
    moments = init_adamw_state(params)

    def local_bytes(tree) -> int:
        return sum(math.prod(t.to_local().shape) * t.element_size() for t in flatten(tree).values())

    print(
        orjson.dumps({"parameters": local_bytes(params), "optimizer_moments": local_bytes(moments)}).decode()
    )


if __name__ == "__main__":
    main()
