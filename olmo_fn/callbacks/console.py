"""The progress display as an observer: a rich bar on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

from typing import Any

from olmo_fn.callbacks.observer import Observer, StateView
from olmo_fn.progress import StepProgress


class ConsoleObserver(Observer):
    """Shows step, loss, tokens/s and ETA on stderr (see `olmo_fn.progress.StepProgress`)."""

    name = "console"

    def __init__(self, total_steps: int, *, start_step: int = 0):
        self.bar = StepProgress(total_steps, start=start_step).__enter__()

    def on_step(self, view: StateView, metrics: dict[str, Any]) -> None:
        self.bar.update(metrics["step"], metrics["loss"], metrics["tokens_per_s"])

    def on_end(self, summary: dict[str, Any]) -> None:
        self.bar.__exit__(None, None, None)
