"""Progress display for long loops: a rich bar on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class StepProgress:
    """Shows step, loss, tokens/s and ETA. Use as a context manager; call `update` after each step."""

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, lines: int = 20):
        self.total, self.enabled = total, enabled
        self.console = Console(stderr=True)
        self.every = max(1, total // lines)
        self._bar: Progress | None = None
        self._start = start
        self._t0 = time.perf_counter()

    def __enter__(self) -> StepProgress:
        if self.enabled and self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self._start, stats="")
        return self

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        stats = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / max(1, step - self._start) * (self.total - step)
            print(f"step {step}/{self.total}  {stats}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
