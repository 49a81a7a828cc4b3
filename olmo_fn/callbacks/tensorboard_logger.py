"""TensorBoard as an observer (the tensorboard extra): every number of every metrics.jsonl record as
a float64 scalar at its step, in event files under RUN_DIR/tensorboard, flushed at each record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from olmo_fn.callbacks.config import require_module
from olmo_fn.callbacks.observer import Observer, StateView

TENSORBOARD_DIR = "tensorboard"


class TensorBoardObserver(Observer):
    name = "tensorboard"

    def __init__(self, run_dir: str | Path, *, start_step: int = 0):
        require_module("tensorboard", "--log.tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # Every attempt marks its start (a session START event at its first step): TensorBoard then
        # hides what an interrupted attempt logged after the checkpoint a resumed one starts from.
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1)

    def on_step(self, view: StateView, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        for key, value in metrics.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)
        self.writer.flush()

    def on_end(self, summary: dict[str, Any]) -> None:
        self.writer.close()
