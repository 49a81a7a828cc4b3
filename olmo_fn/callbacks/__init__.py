"""Observers of a training run: metrics.jsonl, the console, W&B, TensorBoard, the profiler, and any
object with ``on_step`` / ``on_eval`` / ``on_checkpoint`` / ``on_end`` hooks (see `observer`)."""

from olmo_fn.callbacks.config import LogConfig, ProfileConfig, check_logging_options
from olmo_fn.callbacks.group import ObserverError, ObserverGroup
from olmo_fn.callbacks.memory import memory_metrics
from olmo_fn.callbacks.observer import EVAL_PREFIXES, Observer, StateView, state_view

__all__ = [
    "EVAL_PREFIXES",
    "LogConfig",
    "Observer",
    "ObserverError",
    "ObserverGroup",
    "ProfileConfig",
    "StateView",
    "check_logging_options",
    "memory_metrics",
    "state_view",
]
