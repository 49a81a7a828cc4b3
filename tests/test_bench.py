"""`bench` on CPU: the figures it reports are present and consistent with each other."""

from __future__ import annotations

import pytest

from olmo_fn.bench import BenchConfig, run_bench
from olmo_fn.errors import ConfigError
from olmo_fn.graph.flops import flops_per_token
from olmo_fn.graph.presets import PRESETS


def test_bench_reports_consistent_figures():
    cfg = BenchConfig(steps=3, warmup=1, seq_len=32, micro_batch_size=2, grad_accum=2, peak_tflops=0.5)
    out = run_bench(cfg)
    assert out["tokens_per_s"] == pytest.approx(2 * 2 * 32 / out["step_s"], rel=1e-2)
    assert out["flops_per_token"] == flops_per_token(PRESETS["olmo2-tiny"], 32)
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * out["flops_per_token"] / 0.5e12, rel=1e-2)
    assert out["peak_mem_gib"] > 0 and out["first_step_s"] > 0
    assert out["device"].startswith("cpu") and out["torch"] and out["compile"] is False


def test_bench_without_known_peak_reports_no_mfu():
    assert run_bench(BenchConfig(steps=2, warmup=1, seq_len=16, micro_batch_size=1))["mfu"] is None


def test_bench_rejects_warmup_covering_all_steps():
    with pytest.raises(ConfigError, match="bench.warmup=3"):
        BenchConfig(steps=3, warmup=3)


@pytest.mark.parametrize("async_save", [False, True])
def test_bench_with_checkpoints_reports_their_cost(async_save):
    cfg = BenchConfig(
        steps=5, warmup=1, seq_len=16, micro_batch_size=1, checkpoint_interval=2, async_save=async_save
    )
    out = run_bench(cfg)
    tensor_mib = 3 * 4 * out["params"] / 2**20  # fp32 params + two AdamW moments
    assert out["checkpoint_mib"] == pytest.approx(tensor_mib, rel=0.05)
    assert out["save_blocking_s"] > 0 and out["load_s"] > 0 and out["async_save"] is async_save
