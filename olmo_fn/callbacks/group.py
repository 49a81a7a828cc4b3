"""`ObserverGroup`: calls every observer's hooks with copies, and contains their failures.

A failing observer never leaves training half-done or changed:
- a *critical* observer (metrics.jsonl: the run directory's record, on which resuming relies) stops
  the run with a one-line `ObserverError` naming it, the hook and the step;
- any other (the console, W&B, TensorBoard, the profiler, a user's observer) is reported once, in
  one line on stderr naming it, and disabled for the rest of the run, which goes on unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from olmo_fn.callbacks.observer import StateView, eval_entries
from olmo_fn.errors import OlmoFnError, one_line


class ObserverError(OlmoFnError, RuntimeError):
    """A critical observer failed: the run stops (its last checkpoint is intact)."""


def observer_name(observer: object) -> str:
    return getattr(observer, "name", "") or type(observer).__name__


class ObserverGroup:
    """The observers of one run, in order. Use as a context manager: leaving it calls ``on_end``
    (``finished`` is whether the block ended without an exception)."""

    def __init__(self, observers: Sequence[object], run_dir: str | Path):
        self.observers = list(observers)
        self.run_dir = str(run_dir)
        self.disabled: set[int] = set()
        self._last: dict[str, Any] | None = None
        self._t0 = time.perf_counter()
        self._ended = False

    def record(self, view: StateView, metrics: dict[str, Any]) -> None:
        """One update's record: ``on_step`` for every observer, then ``on_eval`` if it has evaluations.
        Each observer gets its own copy of the view (a few fields) and of the metrics."""
        step = metrics["step"]
        for observer in self.observers:
            self._call(observer, "on_step", (copy.copy(view), dict(metrics)), step)
        self._last = dict(metrics)  # recorded: no critical observer failed on it
        evals = eval_entries(metrics)
        if evals:
            for observer in self.observers:
                self._call(observer, "on_eval", (step, dict(evals)), step)

    def checkpoint(self, step: int, path: str | Path) -> None:
        for observer in self.observers:
            self._call(observer, "on_checkpoint", (step, Path(path)), step)

    def end(self, error: BaseException | None = None) -> None:
        """``on_end`` for every observer, once; a critical failure is raised only if `error` is None."""
        if self._ended:
            return
        self._ended = True
        last = self._last or {}
        summary = {
            "run_dir": self.run_dir,
            "step": last.get("step"),
            "tokens_seen": last.get("tokens_seen"),
            "finished": error is None,
            "error": None if error is None else one_line(error),
            "elapsed_s": time.perf_counter() - self._t0,
        }
        failure: ObserverError | None = None
        for observer in self.observers:
            try:
                self._call(observer, "on_end", (dict(summary, metrics=dict(last) or None),), summary["step"])
            except ObserverError as exc:
                failure = failure or exc
        if failure is not None and error is None:
            raise failure

    def _call(self, observer: object, hook: str, args: tuple, step: int | None) -> None:
        method = getattr(observer, hook, None)
        if method is None:
            return
        if id(observer) in self.disabled:
            if hook == "on_end":  # still let it close what it opened; its failure was reported once
                with contextlib.suppress(Exception):
                    method(*args)
            return
        try:
            method(*args)
        except Exception as exc:
            where = f"observer {observer_name(observer)} failed in {hook}"
            where += f" at step {step}" if step is not None else ""
            where += f": {one_line(exc)}"
            if getattr(observer, "critical", False):
                raise ObserverError(f"{where}; the run stops (its last checkpoint is intact)") from exc
            self.disabled.add(id(observer))
            _warn(f"{where}; it is disabled for the rest of the run, which goes on")

    def __enter__(self) -> ObserverGroup:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(exc)


def _warn(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # stderr itself is gone: nothing more to do
        print(message, file=sys.stderr, flush=True)
