"""The tiny MoE preset trains on the embedded corpus: its loss falls at least as far as the dense tiny
preset's (same active parameters, same steps and data) while its experts share the load; a run
interrupted and resumed equals the uninterrupted one; the compiled MoE block equals the eager one."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
import torch

from olmo_fn.config import TrainConfig
from olmo_fn.evaluate import EvalConfig
from olmo_fn.graph.flops import active_params
from olmo_fn.graph.presets import PRESETS
from olmo_fn.state.checkpoint_writer import CheckpointConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.train import train

STEPS = 120


def records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def config(preset: str, run_dir, steps: int = STEPS, **fields) -> TrainConfig:
    fields = {
        "checkpoint": CheckpointConfig(interval=0),
        "schedule": ScheduleConfig(warmup_steps=12),
        **fields,
    }
    return dataclasses.replace(
        TrainConfig(),
        preset=preset,
        model=PRESETS[preset],
        steps=steps,
        global_batch_size=8,
        data=dataclasses.replace(TrainConfig().data, seq_len=128),
        eval=EvalConfig(interval=0, downstream=()),
        run_dir=str(run_dir),
        threads=1,
        **fields,
    )


def test_tiny_moe_learns_at_least_as_well_as_dense_with_balanced_experts(tmp_path):
    """olmoe-tiny against olmo2-tiny, whose active parameters it matches but for its routers: the
    mean loss of the last 20 of 120 steps is no higher; over the second half of the run every layer's
    busiest expert takes under 2x its uniform share (averaged over those steps; the first steps route
    most tokens alike, before the representations separate), and over the whole run every expert's
    share of a layer's assignments is within 1.5x of uniform."""
    moe, dense = PRESETS["olmoe-tiny"], PRESETS["olmo2-tiny"]
    routers = moe.n_layers * moe.moe.n_experts * moe.d_model
    assert active_params(moe) == active_params(dense) + routers + moe.n_layers * moe.moe.n_experts  # biases
    train(config("olmoe-tiny", tmp_path / "moe"), progress=False)
    train(config("olmo2-tiny", tmp_path / "dense"), progress=False)
    moe_records, dense_records = records(tmp_path / "moe"), records(tmp_path / "dense")
    assert len(moe_records) == len(dense_records) == STEPS
    first = moe_records[0]["loss"]
    moe_end = statistics.mean(r["loss"] for r in moe_records[-20:])
    dense_end = statistics.mean(r["loss"] for r in dense_records[-20:])
    assert first - moe_end > 2.5, (first, moe_end)  # it learns: from ln(384) ≈ 5.95 to below 3.5
    assert moe_end <= dense_end, (moe_end, dense_end)
    second_half = moe_records[STEPS // 2 :]
    for layer in range(moe.n_layers):
        busiest = statistics.mean(r[f"moe/layer{layer}/load_max"] for r in second_half)
        idlest = statistics.mean(r[f"moe/layer{layer}/load_min"] for r in second_half)
        assert busiest < 2.0 and idlest > 0.0, (layer, busiest, idlest)
    assert all(r["moe/dropped"] == 0 for r in moe_records)  # dropless
    for r in moe_records:  # metrics.jsonl holds each layer's tokens per expert: every assignment
        assert all(sum(r[f"moe/layer{i}/tokens"]) == 8 * 128 * 2 for i in range(moe.n_layers))
    for layer in range(moe.n_layers):  # over the whole run, every expert's share is near uniform
        per_step = [r[f"moe/layer{layer}/tokens"] for r in moe_records]
        totals = [sum(counts) for counts in zip(*per_step, strict=True)]
        uniform = sum(totals) / moe.moe.n_experts
        assert min(totals) / uniform > 0.5 and max(totals) / uniform < 1.5, (layer, totals)


def test_interrupted_moe_run_resumes_exactly(tmp_path, monkeypatch):
    """8 steps straight, and the same run stopped (as on Ctrl-C) after step 6 and resumed from its
    step-4 checkpoint: the same losses and expert loads bit for bit, and equal final parameters and
    moments."""
    import olmo_fn.train as train_module
    from olmo_fn.graph.param_tree import flatten
    from olmo_fn.state.checkpoint import load_checkpoint
    from olmo_fn.state.train_state import empty_train_state

    from faults import stop_after_step

    def cfg(name):
        return config(
            "olmoe-tiny",
            tmp_path / name,
            steps=8,
            checkpoint=CheckpointConfig(interval=4),
            schedule=ScheduleConfig(warmup_steps=2),
        )

    train(cfg("straight"), progress=False)

    def interrupt():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        stop_after_step(train_module, 6, interrupt, patch.setattr)
        with pytest.raises(KeyboardInterrupt):
            train(cfg("resumed"), progress=False)
    train(cfg("resumed"), progress=False)
    keys = ("loss", "grad_norm", "moe/load_max", "moe/lb_loss")
    a, b = records(tmp_path / "straight"), records(tmp_path / "resumed")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    template = empty_train_state(PRESETS["olmoe-tiny"], device="cpu")
    final = [
        load_checkpoint(tmp_path / name / "checkpoints/step8", template) for name in ("straight", "resumed")
    ]
    for tree in ("params", "opt_state"):
        x, y = (flatten(getattr(state, tree)) for state in final)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), tree


@pytest.mark.compile
def test_compiled_moe_block_equals_eager(gen):
    """One compiled block graph: the capacity path in float32 equals eager to 1e-5, the dropless
    grouped-GEMM path in bfloat16 to bfloat16's rounding."""
    from olmo_fn.graph import init_params
    from olmo_fn.graph.block import block_for
    from olmo_fn.graph.model import loss_sums
    from olmo_fn.parallelize.compile import compile_block

    for dtype, capacity, tol in ((torch.float32, 1.5, 1e-5), (torch.bfloat16, 0.0, 3e-2)):
        cfg = dataclasses.replace(PRESETS["olmoe-tiny"], n_layers=2)
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=capacity))
        params = init_params(cfg, seed=0, dtype=dtype).apply(lambda t: t.requires_grad_(True))
        ids = torch.randint(0, 258, (2, 64), generator=gen)
        results = []
        for block_fn in (block_for(cfg), compile_block(block_for(cfg))):
            ce, _, n, aux = loss_sums(params, ids, ids, cfg, block_fn=block_fn, with_aux=True)
            loss = ce / n + 0.01 * sum(a["lb_sum"] for a in aux.values()) / n
            leaves = dict(params.flatten_keys(".").items())
            trained = [t for path, t in leaves.items() if not path.endswith("expert_bias")]
            grads = torch.autograd.grad(loss, trained)
            results.append((loss.float(), [g.float() for g in grads], aux[1]["expert_tokens"]))
        (eager_loss, eager_grads, eager_load), (comp_loss, comp_grads, comp_load) = results
        torch.testing.assert_close(comp_loss, eager_loss, atol=tol, rtol=tol)
        for got, want in zip(comp_grads, eager_grads, strict=True):
            torch.testing.assert_close(got, want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)
        if dtype == torch.float32:
            assert torch.equal(comp_load, eager_load)
