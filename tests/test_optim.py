"""Functional AdamW, LR schedules and gradient clipping against torch's own implementations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from olmo_fn.errors import ConfigError
from olmo_fn.graph import ModelConfig, init_params
from olmo_fn.graph.param_tree import flatten
from olmo_fn.state.adamw import adamw_update, decays, init_adamw_state
from olmo_fn.state.clip import clip_by_global_norm
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig, lr_at

CFG = ModelConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=24, vocab_size=30)


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_adamw_matches_torch_optim_step_for_step(implementation, gen):
    opt_cfg = OptimConfig(
        lr=1e-2, beta1=0.8, beta2=0.9, eps=1e-7, weight_decay=0.3, implementation=implementation
    )
    params = init_params(CFG, seed=0)
    flat = flatten(params)
    torch_params = {k: v.clone().requires_grad_(True) for k, v in flat.items()}
    decay = [p for k, p in torch_params.items() if decays(k, opt_cfg)]
    no_decay = [p for k, p in torch_params.items() if not decays(k, opt_cfg)]
    assert decay and no_decay
    reference = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.3}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.8, 0.9),
        eps=1e-7,
        foreach=False,
    )
    opt_state = init_adamw_state(params)
    for step in range(1, 6):
        lr = 1e-2 * (0.5 + 0.1 * step)  # the learning rate changes between steps, as under a schedule
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in flat.items()}
        params, opt_state = adamw_update(params, grads, opt_state, step=step, lr=lr, cfg=opt_cfg)
        for group in reference.param_groups:
            group["lr"] = lr
        for k, p in torch_params.items():
            p.grad = grads[k].clone()
        reference.step()
        for k, p in flatten(params).items():
            torch.testing.assert_close(p, torch_params[k].detach(), atol=1e-6, rtol=0)


def test_no_decay_patterns():
    cfg = OptimConfig()
    assert not decays("embeddings", cfg)
    assert not decays("blocks.3.attention_norm", cfg)
    assert not decays("blocks.3.attention.q_norm", cfg)
    assert not decays("lm_head.norm", cfg)
    assert decays("blocks.3.attention.w_q", cfg)
    assert decays("lm_head.w_out", cfg)


def test_adamw_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="optim.beta2=1.0"):
        OptimConfig(beta2=1.0)
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=-1.0)


def naive_lr(step, peak, warmup, total, decay, ratio):
    """Written out case by case from the schedule's definition."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant":
        return peak
    t = (step - warmup) / max(1, total - warmup - 1)
    t = min(t, 1.0)
    final = peak * ratio
    if decay == "linear":
        return peak - (peak - final) * t
    return final + (peak - final) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (5, 50), (10, 11), (3, 3)])
def test_schedule_matches_definition(decay, warmup, total):
    cfg = ScheduleConfig(warmup_steps=warmup, decay=decay, min_lr_ratio=0.1)
    lrs = [lr_at(s, peak=2.0, cfg=cfg, total_steps=total) for s in range(total)]
    assert lrs == pytest.approx([naive_lr(s, 2.0, warmup, total, decay, 0.1) for s in range(total)])


def test_schedule_shape():
    cfg = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, peak=1.0, cfg=cfg, total_steps=100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


@pytest.mark.parametrize("max_norm", [0.5, 100.0, None])
def test_clip_matches_torch(max_norm, gen):
    grads = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen) * 4]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    norm = clip_by_global_norm(grads, max_norm)
    torch.testing.assert_close(norm, expected)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(g, p.grad)
