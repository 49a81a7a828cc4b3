"""fp8 all-gather: under FSDP with the tensorwise recipe, sharded block matrices travel as float8
bytes and train exactly as gathering them in the compute dtype and casting after.

Both sides scale each matrix by the amax of the whole matrix, so their float8 weights are the same
values; the runs below are float32 with emulated float8 matmuls (CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from olmo_fn.graph import ModelConfig
from olmo_fn.graph.param_tree import flatten, unflatten
from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.parallelize.placed_step import Sharding
from olmo_fn.parallelize.plan import apply_plan, default_plan
from olmo_fn.state.adamw import init_adamw_state
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_state import TrainState
from olmo_fn.state.train_step import StepSettings, make_gradient_fn, make_train_step

from plan_cases import STEPS, Case, _everyones, _layout, batch, initial_state, reference, rows_of

pytest.importorskip("torchao")

MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=48, vocab_size=40)
"""Every block matrix dimension a multiple of 16 (float8 matmuls need it)."""


def _case(shape: MeshShape, recipe: str = "tensorwise") -> Case:
    settings = StepSettings(
        MODEL,
        OptimConfig(lr=1e-2),
        ScheduleConfig(warmup_steps=1),
        STEPS,
        2,
        torch.float32,
        fp8=recipe,
        fp8_emulate=True,
    )
    gen = np.random.default_rng(5)
    tokens = tuple(gen.integers(1, MODEL.vocab_size, (4, 16)) for _ in range(STEPS))
    return Case(MODEL, settings, tokens, 0, shape, seed=7)


class _GatherDtypes(TorchDispatchMode):
    """Records the dtype of every all-gather's input."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "all_gather" in str(func):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _patched(sabotage: str | None):
    """Switch the float8 gather off (the control: gather in the compute dtype, cast after), or scale
    each shard by its own amax (a bug the comparison must catch). Returns the undo."""
    import olmo_fn.parallelize.float8_gather as f8
    import olmo_fn.state.train_step as ts

    if sabotage == "compute_dtype_gather":
        real = ts.float8_gathering
        ts.float8_gathering = lambda settings: None
        return lambda: setattr(ts, "float8_gathering", real)
    if sabotage == "amax_per_shard":
        real = f8.gathered_axes
        f8.gathered_axes = lambda stored, rule: []
        return lambda: setattr(f8, "gathered_axes", real)
    return lambda: None


def train_on_rank(rank: int, world: int, case: Case, variant: str | None = None) -> dict | None:
    """Three steps under the default plan for `case.shape` in float32; rank 0 returns the first
    step's gradients, the losses, the final parameters and the dtypes the first step all-gathered."""
    undo = _patched(variant)
    try:
        layout = _layout(case.shape)
        plan = default_plan(case.model, case.shape, compute_dtype=torch.float32)
        full = flatten(initial_state(case).params)
        sharding = Sharding.of(plan, layout, list(full))
        params = apply_plan(unflatten(dict(full)), sharding.plan, layout.mesh)
        state = TrainState(0, params, init_adamw_state(params), 0, 0)
        share = functools.partial(rows_of, index=layout.dp_rank, parts=case.shape.dp)
        seen = _GatherDtypes()  # a dispatch mode: eager only
        with seen if not case.settings.compile else contextlib.nullcontext():
            grads = make_gradient_fn(case.settings, sharding)(state.params, share(batch(case, 0))).grads
        full_grads = _everyones({k: v.full_tensor().detach().numpy() for k, v in grads.items()})
        step_fn, losses = make_train_step(case.settings, sharding), []
        for step in range(STEPS):
            state, metrics = step_fn(state, share(batch(case, step)))
            losses.append(metrics["loss"].item())
        final = _everyones({k: v.full_tensor().detach().numpy() for k, v in flatten(state.params).items()})
    finally:
        undo()
    if rank != 0:
        return None
    return {"grads": full_grads, "losses": losses, "params": final, "gathered": seen.dtypes}


def _assert_close(got: dict, want: dict, tol: float) -> None:
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=tol, atol=0, err_msg="losses")
    for name in ("grads", "params"):
        for key in want[name]:
            np.testing.assert_allclose(
                got[name][key], want[name][key], rtol=tol, atol=tol, err_msg=f"{name} {key}"
            )


@pytest.fixture(scope="module")
def fsdp_runs(pools):
    case = _case(MeshShape(1, 2, 1))
    run = functools.partial(pools(2).run, train_on_rank, case)
    return case, {v: run(v)[0] for v in (None, "compute_dtype_gather", "amax_per_shard")}


def test_block_matrices_travel_as_float8_bytes(fsdp_runs):
    """Each block matrix is gathered twice per step (FSDP reshards after forward and gathers again
    in backward), both times as float8 bytes; the control's same gathers are all float32."""
    _, runs = fsdp_runs
    ours, control = runs[None]["gathered"], runs["compute_dtype_gather"]["gathered"]
    assert ours.count(torch.uint8) == 2 * 7 * MODEL.n_layers, ours
    assert set(control) == {torch.float32}, control
    assert len(ours) == len(control)


def test_float8_gather_trains_as_gathering_in_the_compute_dtype(fsdp_runs):
    _, runs = fsdp_runs
    _assert_close(runs[None], runs["compute_dtype_gather"], tol=1e-6)


def test_the_comparison_catches_a_scale_taken_per_shard(fsdp_runs):
    """Negative control: each rank scaling its shard by its own amax gives other float8 weights."""
    _, runs = fsdp_runs
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        _assert_close(runs["amax_per_shard"], runs["compute_dtype_gather"], tol=1e-6)


def test_fsdp_float8_stays_within_float8_error_of_one_process(fsdp_runs):
    """Data parallelism changes the scales of the activations' gradients (each rank scales its own
    rows), so fp8 under FSDP equals one process only to float8's precision, not exactly."""
    case, runs = fsdp_runs
    one = reference(dataclasses.replace(case))
    np.testing.assert_allclose(runs[None]["losses"], one["losses"], rtol=2e-2)
