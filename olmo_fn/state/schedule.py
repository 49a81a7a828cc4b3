"""Learning-rate schedules: linear warmup, then cosine, linear or no decay over the rest of the run;
warmup-stable-decay (WSD: the peak until the last ``wsd_decay_fraction`` of the run, then a decay of
``wsd_shape``); or inverse square root (``peak * sqrt(warmup / (k + 1))`` after warmup, no end).

A schedule normally spans the whole run. With ``start_step`` it begins later: steps are counted from
there, so warmup and decay fit between that step and the end of the run. That is how a finished run
is annealed: resume it with more steps and a schedule that starts at its last step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from olmo_fn.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """How the learning rate moves from 0 to the peak and back down over the run."""

    warmup_steps: int = 50
    """Steps of linear warmup; update k (0-based) gets ``peak * (k + 1) / warmup_steps``."""
    decay: Literal["cosine", "linear", "constant", "wsd", "inverse_sqrt"] = "cosine"
    """What follows warmup: a cosine or linear decay from the peak to ``min_lr_ratio * peak`` at the
    last step; constant (the peak); wsd (the peak, then the last `wsd_decay_fraction` of the
    schedule's steps decay to ``min_lr_ratio * peak`` with `wsd_shape`); inverse_sqrt
    (``peak * sqrt(max(1, warmup_steps) / (k + 1))`` at update k, independent of the run's length)."""
    wsd_decay_fraction: float = 0.2
    """decay=wsd: the share of the schedule's steps (after warmup) spent decaying at the end."""
    wsd_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """decay=wsd: the decay's shape over its progress p from 0 to 1: linear ``1 - p``, cosine
    ``(1 + cos(pi p)) / 2`` or ``1 - sqrt(p)``, between the peak and the final learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    start_step: int = 0
    """The step this schedule begins at (warmup and decay are counted from it). To anneal a finished
    run, resume it with more --steps and --schedule.start-step set to the step it finished at."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.start_step < 0:
            raise ConfigError(f"schedule.start_step={self.start_step} must be >= 0")
        if not 0 < self.wsd_decay_fraction <= 1:
            raise ConfigError(f"schedule.wsd_decay_fraction={self.wsd_decay_fraction!r} must be in (0, 1]")


def lr_at(step: int, *, peak: float, cfg: ScheduleConfig, total_steps: int) -> float:
    """Learning rate of update `step` (0-based) in a run of `total_steps` updates.

    The schedule covers updates ``cfg.start_step .. total_steps - 1``; an update before its start
    (which a run that starts there never makes) gets the schedule's first learning rate.
    """
    step, total_steps = max(0, step - cfg.start_step), total_steps - cfg.start_step
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return peak
    if cfg.decay == "inverse_sqrt":
        return peak * math.sqrt(max(1, cfg.warmup_steps) / (step + 1))
    final = peak * cfg.min_lr_ratio
    if cfg.decay == "wsd":
        return _wsd(step, peak, final, cfg, total_steps)
    # progress runs from 0 at the first update after warmup to 1 at the last update of the run.
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, progress)
    if cfg.decay == "linear":
        return peak + (final - peak) * progress
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def _wsd(step: int, peak: float, final: float, cfg: ScheduleConfig, total_steps: int) -> float:
    """Warmup-stable-decay after warmup: the decay spans the last ``ceil(fraction * (total - warmup))``
    updates; its progress is ``j / n`` at the j-th of its n updates, so the last one is at the final
    learning rate."""
    decay_steps = math.ceil(cfg.wsd_decay_fraction * max(0, total_steps - cfg.warmup_steps))
    first = total_steps - decay_steps
    if step < first:
        return peak
    progress = min(1.0, (step - first + 1) / decay_steps)
    shape = {
        "linear": 1 - progress,
        "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
        "1-sqrt": 1 - math.sqrt(progress),
    }[cfg.wsd_shape]
    return final + (peak - final) * shape
