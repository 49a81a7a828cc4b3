"""End to end: `train` on the embedded corpus writes a complete run directory and learns."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from olmo_fn.config import TrainConfig, config_from_json
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.state.checkpoint import load_checkpoint, read_manifest
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_state import init_train_state
from olmo_fn.train import train

SHORT = TrainConfig(steps=40, global_batch_size=8, schedule=ScheduleConfig(warmup_steps=10))


def test_short_run_learns_and_writes_a_complete_run_directory(tmp_path):
    cfg = dataclasses.replace(SHORT, run_dir=str(tmp_path / "run"))
    run_dir = train(cfg, progress=False)
    assert config_from_json(run_dir / "config.json") == cfg
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "z_loss", "logsumexp_sq", "tokens_seen"):
        assert all(isinstance(r[key], float | int) for r in rows), key
    assert rows[-1]["tokens_seen"] == 40 * 8 * 256
    # z_loss is the weighted term added to the objective; logsumexp_sq the unweighted mean it weighs.
    assert all(r["z_loss"] == pytest.approx(cfg.z_loss * r["logsumexp_sq"], rel=1e-5) for r in rows)
    assert rows[0]["logsumexp_sq"] > 1 and rows[0]["z_loss"] < 1e-2 * rows[0]["loss"]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    manifest = read_manifest(run_dir / "checkpoints" / "step40")
    assert (manifest["step"], manifest["tokens_seen"], manifest["data_cursor"]) == (40, 40 * 8 * 256, 40 * 8)
    state = load_checkpoint(
        run_dir / "checkpoints" / "step40", init_train_state(cfg.model, seed=99, device="cpu")
    )
    assert state.step == 40


def test_runs_are_deterministic(tmp_path):
    """Same config, same machine: the same loss at every step (no hidden RNG state)."""
    losses = []
    for name in ("a", "b"):
        cfg = dataclasses.replace(
            SHORT,
            steps=4,
            schedule=ScheduleConfig(warmup_steps=2),
            micro_batch_size=4,
            run_dir=str(tmp_path / name),
        )
        losses.append([r["loss"] for r in read_metrics(train(cfg, progress=False) / "metrics.jsonl")])
    assert losses[0] == losses[1]


def test_cli_train_with_dotted_overrides(tmp_path, isolated_cache):
    env = {**os.environ, "OLMO_FN_CACHE": str(isolated_cache)}
    cmd = [
        sys.executable,
        "-m",
        "olmo_fn.run",
        "train",
        "--steps",
        "3",
        "--schedule.warmup-steps",
        "1",
        "--global-batch-size",
        "2",
        "--model.n-layers",
        "2",
        "--data.seq-len",
        "64",
        "--run-dir",
        str(tmp_path / "cli"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cfg = config_from_json(tmp_path / "cli" / "config.json")
    assert (cfg.model.n_layers, cfg.data.seq_len, cfg.steps) == (2, 64, 3)
    assert len(read_metrics(tmp_path / "cli" / "metrics.jsonl")) == 3
    assert (tmp_path / "cli" / "checkpoints" / "step3" / "manifest.json").is_file()
    assert "step 3/3" in proc.stderr
