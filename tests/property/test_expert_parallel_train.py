"""The real command line: ``train --parallel.ep 2`` on olmoe-tiny under torchrun (2 gloo processes on
CPU) makes progress and logs the same metrics, moe/* included, as one process; the first step's loss
and moe metrics agree within 1e-5 relative (fp32 sums in another order; the float64 proof is
test_expert_parallel.py), and the in-loop eval runs collectively under expert parallelism."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_torchrun import launch

from olmo_fn.io.metrics_log import read_metrics

ARGS = [
    *("train", "--preset", "olmoe-tiny", "--steps", "6", "--schedule.warmup-steps", "2"),
    *("--checkpoint.interval", "0", "--eval.interval", "6", "--global-batch-size", "4"),
    *("--micro-batch-size", "1", "--data.seq-len", "64", "--threads", "1"),
]


def steps(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]


def test_train_under_ep_2_makes_progress_and_logs_moe_metrics(tmp_path, isolated_cache):
    done = launch(isolated_cache, *ARGS, "--parallel.ep", "2", "--run-dir", str(tmp_path / "ep2"), procs=2)
    assert done.returncode == 0, done.stderr
    single = launch(isolated_cache, *ARGS, "--run-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    ep, one = steps(tmp_path / "ep2"), steps(tmp_path / "one")
    assert len(ep) == len(one) == 6
    assert ep[-1]["loss"] < ep[0]["loss"] - 0.5
    assert set(ep[0]) == set(one[0]) and any(key.startswith("moe/layer") for key in ep[0])
    for key in [k for k in one[0] if k == "loss" or k.startswith("moe/")]:
        assert ep[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-6), key
    evals = [row for row in read_metrics(tmp_path / "ep2" / "metrics.jsonl") if "eval/val/loss" in row]
    assert evals
