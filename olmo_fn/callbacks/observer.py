"""The observer protocol: what a logger, a profiler or a notebook hook sees of a run, and nothing it
could change it with.

An observer is any object with some of these methods (missing ones are skipped); `Observer` gives
no-op defaults to subclass:

- ``on_step(view, metrics)`` after each update's metrics are read: `view` is a `StateView`, `metrics`
  the record written to metrics.jsonl as a dict of plain Python numbers (the observer's own copy).
- ``on_eval(step, metrics)`` after ``on_step`` for a record that carries evaluation results: the
  ``eval/*`` and ``downstream/*`` entries of it (a copy again).
- ``on_checkpoint(step, path)`` after a checkpoint of `step` is saved to `path` (with
  ``--checkpoint.async-save`` its write may still be in flight; the directory appears once complete).
- ``on_end(summary)`` once, when training stops, whether it finished or failed: a dict with
  ``run_dir``, ``step`` and ``tokens_seen`` (of the last recorded update, or None), ``finished``,
  ``error`` (one line, or None), ``elapsed_s`` and ``metrics`` (the last record, or None).

What an observer gets cannot change training: numbers are Python floats and ints in dicts of its
own, the view is frozen and copies parameters only when asked. (Python hides nothing from code that
goes looking through closures or the garbage collector; the view gives no public path to the live
tensors.) How a failing observer is treated: see `olmo_fn.callbacks.group`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from tensordict import TensorDict

from olmo_fn.state.train_state import TrainState

EVAL_PREFIXES = ("eval/", "downstream/")
"""Metrics keys that hold evaluation results (held-out loss, downstream task scores)."""


class Observer:
    """Base class with no-op hooks. ``critical = True`` makes a failure stop the run (see the group)."""

    name: str = ""
    critical: bool = False

    def on_step(self, view: StateView, metrics: dict[str, Any]) -> None:
        pass

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Any) -> None:
        pass

    def on_end(self, summary: dict[str, Any]) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class StateView:
    """A read-only view of the training state at a metrics record.

    step, tokens_seen: of the record. params_step: the update the parameters of `params()` follow;
    equal to `step` on CPU, and one ahead on CUDA, where metrics are read a step behind the device.
    Nothing is copied until `params()` or `config()` is called.
    """

    step: int
    tokens_seen: int
    params_step: int
    _copy_params: Callable[[], TensorDict] = dataclasses.field(repr=False, compare=False)
    _copy_config: Callable[[], dict[str, Any]] = dataclasses.field(repr=False, compare=False)

    def params(self) -> TensorDict:
        """A detached copy of the parameters (fp32; this rank's shards under a placement plan).
        Costs a model's worth of memory and a copy per call."""
        return self._copy_params()

    def config(self) -> dict[str, Any]:
        """A copy of the run's config as JSON-ready data."""
        return self._copy_config()


def state_view(step: int, tokens_seen: int, state: TrainState) -> StateView:
    """The view an observer gets of the record of `step`, with `state` the newest training state."""
    params: TensorDict = state.params
    config: Mapping[str, Any] = state.config
    return StateView(
        step=step,
        tokens_seen=tokens_seen,
        params_step=state.step,
        _copy_params=lambda: params.apply(lambda t: t.detach().clone()),
        _copy_config=lambda: copy.deepcopy(dict(config)),
    )


def eval_entries(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation results of a record (empty when it has none)."""
    return {k: v for k, v in metrics.items() if k.startswith(EVAL_PREFIXES)}
