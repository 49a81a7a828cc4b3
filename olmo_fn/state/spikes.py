"""Skipping the update of a spiking step.

A step spikes when its loss or its gradient norm lies more than ``sigmas`` standard deviations above
the mean of the last ``window`` steps that were not skipped. Its update is skipped: parameters and
optimizer state stay as they were; the batch counts as consumed and the schedule moves on. The window
is part of the train state (written in every checkpoint), so a resume decides exactly as the
uninterrupted run would. Deciding needs the loss and norm on the host: one device sync per step, paid
only when skipping is on.
"""

from __future__ import annotations

import dataclasses
import math

from olmo_fn.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SpikeConfig:
    """When a step's update is skipped as a spike."""

    sigmas: float = 0.0
    """Skip a step whose loss or gradient norm exceeds the window's mean by more than this many
    standard deviations; 0: never skip."""
    window: int = 128
    """Steps (not skipped) whose losses and gradient norms the mean and deviation are taken over."""
    min_steps: int = 20
    """Never skip before the window holds this many steps."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.sigmas < math.inf:
            problems.append(f"spike.sigmas={self.sigmas!r} must be finite and >= 0 (0: never skip)")
        if self.window < 2:
            problems.append(f"spike.window={self.window} must be >= 2")
        if not 2 <= self.min_steps <= self.window:
            problems.append(f"spike.min_steps={self.min_steps} must be in [2, spike.window={self.window}]")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class SpikeWindow:
    """The recent losses and gradient norms of steps that were not skipped (oldest first), and how many
    steps the run has skipped so far."""

    losses: tuple[float, ...] = ()
    grad_norms: tuple[float, ...] = ()
    skipped: int = 0

    def to_json(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "skipped": self.skipped}

    @classmethod
    def from_json(cls, data: dict) -> SpikeWindow:
        return cls(
            tuple(map(float, data["losses"])), tuple(map(float, data["grad_norms"])), int(data["skipped"])
        )


def exceeds(value: float, history: tuple[float, ...], cfg: SpikeConfig) -> bool:
    """Whether `value` is more than ``cfg.sigmas`` (population) standard deviations above the mean of
    `history`, or not finite; never while `history` holds fewer than ``cfg.min_steps`` values."""
    if cfg.sigmas == 0 or len(history) < cfg.min_steps:
        return False
    if not math.isfinite(value):
        return True
    mean = sum(history) / len(history)
    std = math.sqrt(sum((h - mean) ** 2 for h in history) / len(history))
    return value > mean + cfg.sigmas * std


def judge(window: SpikeWindow, loss: float, grad_norm: float, cfg: SpikeConfig) -> tuple[bool, SpikeWindow]:
    """``(skip, next window)`` for a step with this loss and gradient norm."""
    if exceeds(loss, window.losses, cfg) or exceeds(grad_norm, window.grad_norms, cfg):
        return True, dataclasses.replace(window, skipped=window.skipped + 1)
    keep = cfg.window
    return False, SpikeWindow(
        (*window.losses, loss)[-keep:], (*window.grad_norms, grad_norm)[-keep:], window.skipped
    )
