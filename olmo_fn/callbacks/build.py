"""The observers a training run is configured with, in the order they are called."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from olmo_fn.callbacks.config import LogConfig, ProfileConfig
from olmo_fn.callbacks.console import ConsoleObserver
from olmo_fn.callbacks.group import ObserverGroup
from olmo_fn.callbacks.metrics_jsonl import MetricsJsonlObserver
from olmo_fn.callbacks.profiler import StepProfiler

METRICS_FILE = "metrics.jsonl"


def build_observers(
    *,
    log: LogConfig,
    profile: ProfileConfig,
    run_dir: Path,
    device: torch.device,
    total_steps: int,
    start_step: int,
    config: dict[str, Any],
    coordinator: bool,
    rank: int | None,
    progress: bool,
    extra: Sequence[object] = (),
) -> tuple[ObserverGroup, StepProfiler | None]:
    """``(group, profiler)``. The coordinator (rank 0, or the only process) gets metrics.jsonl, the
    console (with `progress`), W&B and TensorBoard as configured, then the `extra` observers; every
    rank gets the profiler when ``profile.steps`` is set (its trace files carry the rank under torchrun).
    The profiler is also returned so that the caller can wrap its train step with it."""
    observers: list[object] = []
    try:
        if coordinator:
            observers.append(MetricsJsonlObserver(run_dir / METRICS_FILE))
            if progress:
                observers.append(ConsoleObserver(total_steps, start_step=start_step))
            if log.wandb:
                from olmo_fn.callbacks.wandb_logger import WandbObserver

                observers.append(WandbObserver(log, run_dir, config))
            if log.tensorboard:
                from olmo_fn.callbacks.tensorboard_logger import TensorBoardObserver

                observers.append(TensorBoardObserver(run_dir, start_step=start_step))
            observers.extend(extra)
    except BaseException as exc:  # close what was opened before the one that could not start
        ObserverGroup(observers, run_dir).end(exc)
        raise
    profiler = None
    if profile.range is not None:
        first, last = profile.range
        profiler = StepProfiler(first, last, run_dir, device, rank=rank, verbose=progress)
        observers.append(profiler)
    return ObserverGroup(observers, run_dir), profiler
