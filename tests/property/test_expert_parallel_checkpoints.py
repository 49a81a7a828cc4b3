"""A checkpoint written under expert parallelism loads under one process and under other plans, and the
other way round, moments included, with the values it was written with (DCP reshards the experts,
stored Shard(0) over ep and Shard(1) over the other dp_shard / ep ranks, like any DTensor)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoints_across_plans import everything
from test_expert_parallel import tiny_moe
from torch.distributed.tensor import Replicate, Shard

from olmo_fn.graph.param_tree import flatten
from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.parallelize.plan import apply_plan, default_plan
from olmo_fn.state.adamw import init_adamw_state
from olmo_fn.state.checkpoint import load_checkpoint, save_checkpoint
from olmo_fn.state.train_state import TrainState, empty_train_state

from plan_cases import _everyones, _layout

MODEL = tiny_moe(moe={"hidden": 10, "shared_hidden": 6})
"""Experts of width 10: uneven over dp_shard / ep = 2 x ... (shard(1)), even over ep."""


def written_state() -> TrainState:
    """Parameters and both moments filled with distinct values, the same in every process."""
    gen = torch.Generator().manual_seed(7)
    state = empty_train_state(MODEL, device="cpu")
    fill = lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype)  # noqa: E731
    params = state.params.apply(fill)
    opt = init_adamw_state(params).apply(fill)
    return TrainState(11, params, opt, 44, 1408, {"k": 1}, "f")


def place(state: TrainState, shape: MeshShape) -> TrainState:
    """`state` placed by the default plan for `shape` (experts on the expert mesh)."""
    layout = _layout(shape)
    plan = default_plan(MODEL, shape)
    placed = lambda tree: apply_plan(tree, plan, layout.mesh, layout.expert_mesh)  # noqa: E731
    params = placed(state.params)
    opt = {m: placed(state.opt_state[m]) for m in ("exp_avg", "exp_avg_sq")}
    return dataclasses.replace(state, params=params, opt_state=init_adamw_state(params).update(opt))


def save_on_rank(rank: int, world: int, shape: MeshShape, directory: Path) -> None:
    save_checkpoint(directory, place(written_state(), shape))


def load_on_rank(rank: int, world: int, shape: MeshShape, directory: Path) -> dict | None:
    loaded = load_checkpoint(directory, place(empty_train_state(MODEL, device="cpu"), shape))
    values = _everyones(everything(loaded))
    return values if rank == 0 else None


def expert_placements(rank: int, world: int, shape: MeshShape) -> list | None:
    """The stored placements of one expert tensor (to show the plan placed it on the expert mesh)."""
    params = place(written_state(), shape).params
    t = flatten(params)["blocks.0.feed_forward.experts.w1"]
    return [t.device_mesh.mesh_dim_names, t.placements] if rank == 0 else None


EP2 = MeshShape(1, 2, 1, ep=2)
EP2_FSDP2 = MeshShape(1, 4, 1, ep=2)


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [
        (EP2, None),  # EP 2 -> one process, no plan
        (None, EP2),  # one process -> EP 2
        (EP2_FSDP2, EP2),  # EP 2 x FSDP 2 at 4 ranks -> EP 2 at 2
        (EP2, MeshShape(1, 2, 1)),  # EP 2 -> FSDP 2 (experts sharded by dim 0 like every weight)
        (MeshShape(2, 1, 1), MeshShape(1, 4, 1, ep=4)),  # replicated -> EP 4
    ],
    ids=lambda s: "one process" if s is None else str(s).replace(" ", ""),
)
def test_saved_under_ep_loads_elsewhere(pools, tmp_path, saved, loaded):
    directory = tmp_path / "step11"
    if saved is None:
        save_checkpoint(directory, written_state())
    else:
        pools(saved.world).run(save_on_rank, saved, directory)
    want = everything(written_state())
    if loaded is None:
        got = everything(load_checkpoint(directory, empty_train_state(MODEL, device="cpu")))
    else:
        got = pools(loaded.world).run(load_on_rank, loaded, directory)[0]
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_experts_are_placed_on_the_expert_mesh(pools):
    names, placements = pools(4).run(expert_placements, EP2_FSDP2)[0]
    assert names == ("dp_replicate", "dp_shard_mod_ep", "ep", "tp")
    assert placements == (Replicate(), Shard(1), Shard(0), Replicate())
