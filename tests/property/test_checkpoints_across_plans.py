"""A checkpoint written under one plan and world size loads under any other, moments included, with
the values it was written with (DCP reshards on load): FSDP, HSDP, TP, CP, and pipeline stages that
each write only their own layers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from olmo_fn.graph import ModelConfig
from olmo_fn.graph.param_tree import flatten, unflatten
from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.parallelize.placed_step import PipelineSpec
from olmo_fn.parallelize.plan import apply_plan, default_plan
from olmo_fn.parallelize.world import rank_paths
from olmo_fn.state.adamw import init_adamw_state
from olmo_fn.state.checkpoint import load_checkpoint, save_checkpoint
from olmo_fn.state.train_state import TrainState, empty_train_state

from plan_cases import _everyones, _layout

MODEL = ModelConfig(d_model=12, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=10, vocab_size=22)
"""Sizes that shard unevenly over 4 (d_model 12 / 8 rows, mlp 10) and evenly over tp 2."""


def written_state() -> TrainState:
    """Parameters and both moments filled with distinct values, the same in every process."""
    gen = torch.Generator().manual_seed(7)
    state = empty_train_state(MODEL, device="cpu")
    fill = lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype)  # noqa: E731
    params = state.params.apply(fill)
    opt = init_adamw_state(params).apply(fill)
    return TrainState(11, params, opt, 44, 1408, {"k": 1}, "f")


def everything(state: TrainState) -> dict[str, np.ndarray]:
    """Every tensor of a state as a full array (DTensors gathered: collective)."""
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().numpy()  # noqa: E731
    return {f"params.{k}": full(v) for k, v in flatten(state.params).items()} | {
        f"opt.{k}": full(v) for k, v in flatten(state.opt_state).items()
    }


def place(state: TrainState, shape: MeshShape) -> TrainState:
    """`state` placed by the default plan for `shape`; under pipeline parallelism (1F1B), only this
    rank's stage's tensors."""
    layout = _layout(shape)
    plan = default_plan(MODEL, shape)
    paths = list(flatten(state.params))
    if shape.pp > 1:
        paths = rank_paths(MODEL, layout, PipelineSpec("1f1b", 1))
        plan = plan.for_paths(paths)

    def placed(tree):
        flat = flatten(tree)
        return apply_plan(unflatten({p: flat[p] for p in paths}), plan, layout.mesh)

    params = placed(state.params)
    opt = {m: placed(state.opt_state[m]) for m in ("exp_avg", "exp_avg_sq")}
    return dataclasses.replace(state, params=params, opt_state=init_adamw_state(params).update(opt))


def save_on_rank(rank: int, world: int, shape: MeshShape, directory: Path) -> None:
    save_checkpoint(directory, place(written_state(), shape))


def load_on_rank(rank: int, world: int, shape: MeshShape, directory: Path) -> dict | None:
    loaded = load_checkpoint(directory, place(empty_train_state(MODEL, device="cpu"), shape))
    values = _everyones(everything(loaded))  # pipeline ranks hold different layers
    return values if rank == 0 else None


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [
        (MeshShape(1, 2, 2), MeshShape(1, 2, 1)),  # FSDP 2 x TP 2 at 4 ranks -> FSDP 2 at 2
        (MeshShape(1, 2, 2), None),  # -> one process, no plan
        (MeshShape(2, 1, 2), MeshShape(1, 1, 2)),  # HSDP x TP -> TP
        (MeshShape(1, 1, 2), MeshShape(2, 2, 1)),  # TP at 2 -> HSDP 2 x 2 at 4
        (MeshShape(1, 2, 1, pp=2), MeshShape(1, 2, 1, cp=2)),  # PP 2 x FSDP 2 -> CP 2 x FSDP 2
        (MeshShape(1, 2, 1, pp=2), None),  # PP 2 x FSDP 2 -> one process
        (MeshShape(1, 2, 1, pp=2), MeshShape(1, 2, 2)),  # PP 2 x FSDP 2 -> FSDP 2 x TP 2
        (MeshShape(1, 1, 2, cp=2), MeshShape(1, 1, 2, pp=2)),  # CP 2 x TP 2 -> PP 2 x TP 2
    ],
    ids=lambda s: "one process" if s is None else str(s).replace(" ", ""),
)
def test_saved_under_one_plan_loads_under_another(pools, tmp_path, saved, loaded):
    directory = tmp_path / "step11"
    pools(saved.world).run(save_on_rank, saved, directory)
    want = everything(written_state())
    if loaded is None:
        state = load_checkpoint(directory, empty_train_state(MODEL, device="cpu"))
        got = everything(state)
    else:
        got = pools(loaded.world).run(load_on_rank, loaded, directory)[0]
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
