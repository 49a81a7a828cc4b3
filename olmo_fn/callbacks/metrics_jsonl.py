"""metrics.jsonl as an observer: one JSON object per record, flushed as written (a crash loses
nothing). Critical: the run stops if it cannot be written, since resuming relies on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from olmo_fn.callbacks.observer import Observer, StateView
from olmo_fn.io.metrics_log import MetricsLog


class MetricsJsonlObserver(Observer):
    name = "metrics.jsonl"
    critical = True

    def __init__(self, path: str | Path):
        self.log = MetricsLog(path)

    def on_step(self, view: StateView, metrics: dict[str, Any]) -> None:
        self.log.write(metrics)

    def on_end(self, summary: dict[str, Any]) -> None:
        self.log.close()
