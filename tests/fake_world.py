"""Place a model by its plan at a large world size inside one process (a fake process group: shapes
and placements are real, collectives do nothing) and print what rank 0 holds, as JSON.

python tests/fake_world.py PRESET WORLD DP_REPLICATE DP_SHARD TP [CP [PP]] [--model.FIELD VALUE ...]

Under pipeline parallelism (1F1B), rank 0 holds the first stage's parameters only.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import orjson
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from olmo_fn.graph import get_preset
from olmo_fn.graph.init import init_params
from olmo_fn.graph.param_tree import flatten, unflatten
from olmo_fn.parallelize.mesh import Layout, build_mesh
from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.parallelize.placed_step import PipelineSpec
from olmo_fn.parallelize.plan import apply_plan, default_plan
from olmo_fn.parallelize.world import rank_paths
from olmo_fn.state.adamw import init_adamw_state


def main() -> None:
    preset, world, *rest = sys.argv[1:]
    flags = next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))
    sizes, overrides = [int(a) for a in rest[:flags]], rest[flags:]
    shape = MeshShape(*sizes)
    assert shape.world == int(world)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=shape.world)
    model = get_preset(preset)
    for flag, value in zip(overrides[::2], overrides[1::2], strict=True):
        field = flag.removeprefix("--model.").replace("-", "_")
        model = dataclasses.replace(model, **{field: type(getattr(model, field))(value)})
    layout = Layout(build_mesh(shape, torch.device("cpu")), shape)
    plan = default_plan(model, shape)
    full = flatten(init_params(model, device="meta"))
    paths = list(full)
    if shape.pp > 1:
        paths = rank_paths(model, layout, PipelineSpec("1f1b", 1))
        plan = plan.for_paths(paths)
    params = apply_plan(unflatten({p: full[p] for p in paths}), plan, layout.mesh)
    moments = init_adamw_state(params)

    def local_bytes(tree) -> int:
        return sum(math.prod(t.to_local().shape) * t.element_size() for t in flatten(tree).values())

    print(
        orjson.dumps({"parameters": local_bytes(params), "optimizer_moments": local_bytes(moments)}).decode()
    )


if __name__ == "__main__":
    main()
