"""SIGKILL a training process (mid-run or mid-checkpoint), resume it, and get the uninterrupted losses.

Each run is a real subprocess of ``python -m olmo_fn.run train`` (through tests/crash_train.py, which
kills the process at a chosen moment). Comparisons are exact: CPU training here is deterministic.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.state.checkpoint import list_checkpoints

HERE = Path(__file__).parent
STEPS = 10
ARGS = (
    f"--steps {STEPS} --model.d-model 64 --model.n-layers 2 --model.n-heads 2 --model.n-kv-heads 2 "
    "--model.mlp-hidden 128 --data.seq-len 64 --global-batch-size 4 --schedule.warmup-steps 3"
).split()


def run(args: list[str], cache: Path, crash: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    prefix = (
        [sys.executable, str(HERE / "crash_train.py"), crash[0], str(crash[1]), "--"]
        if crash
        else [sys.executable, "-m", "olmo_fn.run"]
    )
    env = {**os.environ, "OLMO_FN_CACHE": str(cache)}
    return subprocess.run(prefix + args, env=env, capture_output=True, text=True, timeout=300)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


_baselines: dict[int, list[float]] = {}


def baseline(accum: int, cache: Path) -> list[float]:
    """Losses of the uninterrupted run with `accum` micro-batches per step (computed once)."""
    if accum not in _baselines:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            proc = run(
                ["train", *ARGS, "--micro-batch-size", str(4 // accum), "--run-dir", str(run_dir)], cache
            )
            assert proc.returncode == 0, proc.stderr
            _baselines[accum] = losses(run_dir)
    return _baselines[accum]


@given(
    kill_after=st.integers(1, STEPS - 1),
    interval=st.integers(1, 4),
    accum=st.sampled_from([1, 2]),
    async_save=st.booleans(),
)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(
    isolated_cache, kill_after, interval, accum, async_save
):
    assume(kill_after > interval)  # a checkpoint was begun before the kill
    expected = baseline(accum, isolated_cache)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = [
            "train",
            *ARGS,
            "--micro-batch-size",
            str(4 // accum),
            "--checkpoint.interval",
            str(interval),
            "--run-dir",
            str(run_dir),
        ]
        if async_save:
            args.append("--checkpoint.async-save")
        crashed = run(args, isolated_cache, crash=("after-step", kill_after))
        assert crashed.returncode == -9, crashed.stderr
        saved = [s for s, _ in list_checkpoints(run_dir)]
        resumed = run(["train", "--run-dir", str(run_dir)], isolated_cache)
        if not saved:  # only when every write was still in flight in the background
            assert async_save
            assert resumed.returncode == 2 and "no complete checkpoint to resume from" in resumed.stderr
            return
        assert max(saved) <= kill_after
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming {run_dir} from step {max(saved)}" in resumed.stderr
        assert losses(run_dir) == expected


@pytest.mark.parametrize("async_save", [False, True])
def test_sigkill_during_checkpoint_write_falls_back_to_the_previous_one(isolated_cache, tmp_path, async_save):
    run_dir = tmp_path / "run"
    args = ["train", *ARGS, "--checkpoint.interval", "3", "--run-dir", str(run_dir)]
    if async_save:
        args.append("--checkpoint.async-save")
    crashed = run(args, isolated_cache, crash=("in-save", 6))
    assert crashed.returncode == -9, crashed.stderr
    assert [s for s, _ in list_checkpoints(run_dir)] == [3]
    assert (run_dir / "checkpoints/.step6.tmp/.metadata").is_file()  # written, never completed
    resumed = run(["train", "--run-dir", str(run_dir)], isolated_cache)
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 3" in resumed.stderr
    assert losses(run_dir) == baseline(1, isolated_cache)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step10", "step9"]
