"""`train_step` against a hand-written torch reference step; accumulation; loss normalisation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from olmo_fn.graph import ModelConfig, init_params, loss_sums
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.instances import make_batch
from olmo_fn.state.adamw import decays, init_adamw_state
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig, lr_at
from olmo_fn.state.train_state import TrainState, init_train_state
from olmo_fn.state.train_step import StepSettings, make_train_step

import reference as ref

CFG = ModelConfig(
    d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48, vocab_size=50, rope_theta=1e4
)
EOS = 3


def settings(**overrides):
    base = StepSettings(
        model=CFG,
        optim=OptimConfig(lr=1e-2, weight_decay=0.1),
        schedule=ScheduleConfig(warmup_steps=2),
        total_steps=6,
        micro_batch_size=4,
        z_loss=1e-3,
        max_grad_norm=0.5,
        compute_dtype=torch.float64,
    )
    return dataclasses.replace(base, **overrides)


def state64(seed=0) -> TrainState:
    params = init_params(CFG, seed=seed, dtype=torch.float64)
    params.apply_(lambda t: t.requires_grad_(True))
    return TrainState(0, params, init_adamw_state(params), 0, 0, "")


def random_batch(gen, rows=8, seq=24, ignore_frac=0.0):
    batch = make_batch(torch.randint(0, CFG.vocab_size, (rows, seq), generator=gen), EOS)
    if ignore_frac:
        drop = torch.rand(rows, seq, generator=gen) < ignore_frac
        batch = dataclasses.replace(batch, labels=batch.labels.masked_fill(drop, -100))
    return batch


def test_step_matches_torch_reference(gen):
    """Three steps equal plain autograd + clip_grad_norm_ + torch.optim.AdamW with the same schedule."""
    s = settings(micro_batch_size=8)
    step_fn = make_train_step(s)
    state = state64()
    torch_params = {k: v.detach().clone().requires_grad_(True) for k, v in flatten(state.params).items()}
    opt = torch.optim.AdamW(
        [
            {"params": [p for k, p in torch_params.items() if decays(k, s.optim)], "weight_decay": 0.1},
            {"params": [p for k, p in torch_params.items() if not decays(k, s.optim)], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(s.optim.beta1, s.optim.beta2),
        eps=s.optim.eps,
    )
    from olmo_fn.graph.param_tree import unflatten

    for step in range(3):
        batch = random_batch(gen, ignore_frac=0.2)
        state, metrics = step_fn(state, batch)
        ce, z, n = loss_sums(
            unflatten(torch_params),
            batch.input_ids,
            batch.labels,
            CFG,
            positions=batch.positions,
            doc_ids=batch.doc_ids,
        )
        opt.zero_grad()
        ((ce + 1e-3 * z) / n).backward()
        norm = torch.nn.utils.clip_grad_norm_(list(torch_params.values()), 0.5)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak=1e-2, cfg=s.schedule, total_steps=6)
        opt.step()
        assert metrics["loss"].item() == pytest.approx((ce / n).item(), rel=1e-12)
        assert metrics["grad_norm"].item() == pytest.approx(norm.item(), rel=1e-9)
        for k, p in flatten(state.params).items():
            torch.testing.assert_close(p, torch_params[k], atol=1e-10, rtol=1e-10)
    assert state.step == 3 and state.data_cursor == 24 and state.tokens_seen == 3 * 8 * 24


def test_accumulation_equals_whole_batch(gen):
    """Micro-batches of 2 with uneven target counts give the update of one batch of 8 (float64)."""
    batches = [random_batch(gen, ignore_frac=0.4) for _ in range(2)]
    results = []
    for micro in (8, 2):
        step_fn = make_train_step(settings(micro_batch_size=micro))
        state = state64()
        for batch in batches:
            state, metrics = step_fn(state, batch)
        results.append((flatten(state.params), metrics))
    (whole, m_whole), (accum, m_accum) = results
    for k in whole:
        torch.testing.assert_close(accum[k], whole[k], atol=1e-12, rtol=1e-12)
    assert m_accum["loss"].item() == pytest.approx(m_whole["loss"].item(), rel=1e-12)


def test_reported_loss_is_mean_over_all_targets(gen):
    batch = random_batch(gen, rows=4, seq=6, ignore_frac=0.5)
    state = state64()
    expected_logits = ref.logits(state.params, batch.input_ids, batch.positions, batch.doc_ids, CFG)
    ce, z, n = ref.cross_entropy_sums(expected_logits, batch.labels)
    _, metrics = make_train_step(settings(micro_batch_size=1))(state, batch)
    assert int(metrics["n_targets"]) == n
    assert metrics["loss"].item() == pytest.approx(ce / n, rel=1e-6)  # fp32 RoPE tables
    assert metrics["logsumexp_sq"].item() == pytest.approx(z / n, rel=1e-6)
    assert metrics["z_loss"].item() == pytest.approx(1e-3 * z / n, rel=1e-6)  # weight from settings()


def test_bf16_compute_keeps_fp32_masters(gen):
    state = init_train_state(CFG, seed=0, device="cpu")
    before = flatten(state.params)["blocks.0.attention.w_q"].detach().clone()
    batch = random_batch(gen)
    _, m32 = make_train_step(settings(compute_dtype=torch.float32))(
        init_train_state(CFG, seed=0, device="cpu"), batch
    )
    new, m16 = make_train_step(settings(compute_dtype=torch.bfloat16))(state, batch)
    after = flatten(new.params)["blocks.0.attention.w_q"]
    assert after.dtype == torch.float32 and new.opt_state["exp_avg", "embeddings"].dtype == torch.float32
    assert not torch.equal(before, after)
    assert m16["loss"].item() == pytest.approx(m32["loss"].item(), rel=2e-2)


def test_training_reduces_loss_on_a_fixed_batch(gen):
    step_fn = make_train_step(settings(total_steps=30, max_grad_norm=1.0, compute_dtype=torch.float32))
    state = init_train_state(CFG, seed=0, device="cpu")
    batch = random_batch(gen)
    losses = []
    for _ in range(30):
        state, metrics = step_fn(state, batch)
        losses.append(metrics["loss"].item())
    assert losses[-1] < 0.5 * losses[0]
