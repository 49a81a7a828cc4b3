"""A tiny training run (6 steps, checkpoints every 3, evaluation every 3) that tests of what watches a
run (observers, loggers) share: `TINY` and `run` (a test helper)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from olmo_fn.config import TrainConfig
from olmo_fn.evaluate import EvalConfig
from olmo_fn.state.checkpoint_writer import CheckpointConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.train import train

_BASE = TrainConfig()
TINY = dataclasses.replace(
    _BASE,
    model=dataclasses.replace(_BASE.model, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=128),
    data=dataclasses.replace(_BASE.data, seq_len=64),
    steps=6,
    global_batch_size=4,
    schedule=ScheduleConfig(warmup_steps=2),
    checkpoint=CheckpointConfig(interval=3),
    eval=EvalConfig(interval=3, max_instances=4, downstream=()),
    threads=1,  # the same thread count in every run, so equal runs are bit for bit equal
)


def run(tmp_path: Path, name: str, observers=(), **fields) -> Path:
    """Train `TINY` (with `fields` replaced) in ``tmp_path / name``; returns the run directory."""
    cfg = dataclasses.replace(TINY, run_dir=str(tmp_path / name), **fields)
    return train(cfg, progress=False, observers=observers)
