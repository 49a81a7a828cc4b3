"""Activation checkpointing policies: every policy gives the loss and gradients of none (bitwise
where the ops are deterministic), eager and compiled; the policies really drop activations; and the
combinations that cannot work are refused up front."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from olmo_fn.errors import ConfigError
from olmo_fn.graph import ModelConfig, init_params
from olmo_fn.io.instances import make_batch
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_step import StepSettings, make_gradient_fn

CFG = ModelConfig(
    d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden=48, vocab_size=50, window_pattern=(8, 0)
)
EOS = 3


def settings(**overrides) -> StepSettings:
    base = StepSettings(
        model=CFG,
        optim=OptimConfig(),
        schedule=ScheduleConfig(warmup_steps=1),
        total_steps=2,
        micro_batch_size=2,
        z_loss=1e-3,
    )
    return dataclasses.replace(base, **overrides)


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return make_batch(torch.randint(0, CFG.vocab_size, (4, 24), generator=gen), EOS)


def gradients(s: StepSettings, dtype=torch.float32):
    params = init_params(CFG, seed=0, dtype=dtype)
    params.apply_(lambda t: t.requires_grad_(True))
    result = make_gradient_fn(s)(params, batch())
    return result.ce_sum, result.z_sum, result.grads


def assert_same(expected, got, *, exact: bool):
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(got[0], expected[0], **tol)
    torch.testing.assert_close(got[1], expected[1], **tol)
    assert got[2].keys() == expected[2].keys()
    for path in expected[2]:
        torch.testing.assert_close(got[2][path], expected[2][path], **tol, msg=path)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_eager_policies_equal_none_bitwise(policy):
    expected = gradients(settings(ac="none"))
    assert_same(expected, gradients(settings(ac=policy)), exact=True)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_the_comparison_sees_a_changed_gradient(policy):
    """Negative control: the same comparison fails for a model one weight away."""
    expected = gradients(settings(ac="none"))
    ce, z, grads = gradients(settings(ac=policy))
    grads = dict(grads)
    path = next(iter(grads))
    grads[path] = grads[path] + 1e-5
    with pytest.raises(AssertionError):
        assert_same(expected, (ce, z, grads), exact=True)


def forward_peak_bytes(s: StepSettings) -> int:
    """Peak bytes of tensors made during one forward (what it keeps for backward, at its end)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from olmo_fn.state.train_step import make_loss_sums_fn

    params = init_params(CFG, seed=0)
    params.apply_(lambda t: t.requires_grad_(True))
    tracker = MemTracker()
    with tracker:
        make_loss_sums_fn(s)(params, batch())
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_policies_keep_fewer_activations():
    """full keeps less than selective, which keeps less than none (peak memory of a forward)."""
    none, selective, full = (forward_peak_bytes(settings(ac=p)) for p in ("none", "selective", "full"))
    assert full < selective < none, (none, selective, full)


def test_impossible_combinations_are_refused():
    with pytest.raises(ConfigError, match="ac=budget .* needs compile"):
        make_gradient_fn(settings(ac="budget", compile=False))
    with pytest.raises(ConfigError, match="ac_budget=1.5"):
        make_gradient_fn(settings(ac="budget", ac_budget=1.5, compile=True))


@pytest.mark.compile
def test_compiled_policies_equal_eager_none():
    """Compiled blocks under every policy (budget included) give eager none's loss and gradients."""
    expected = gradients(settings(ac="none"))
    for policy in ("full", "selective", "budget"):  # none compiled: tests/test_compile.py
        got = gradients(settings(ac=policy, compile=True, ac_budget=0.3))
        assert_same(expected, got, exact=False)
        torch._dynamo.reset()
