"""Periodic checkpointing during a run: when to save, synchronous or overlapped writes, retention."""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from olmo_fn.errors import CheckpointError, ConfigError
from olmo_fn.parallelize.dist import rank
from olmo_fn.state.checkpoint import (
    begin_save,
    checkpoint_path,
    finish_save,
    prune_checkpoints,
    save_failure,
)
from olmo_fn.state.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and which are kept."""

    interval: int = 100
    """Save every this many steps (and always after the last step); 0 saves only at the end."""
    keep_last: int = 2
    """Keep this many of the newest checkpoints."""
    permanent_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, forever; 0: none."""
    async_save: bool = False
    """Write checkpoints in the background while training goes on (tensors are copied first)."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ConfigError(f"checkpoint.interval={self.interval} must be >= 0")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 1")
        if self.permanent_every < 0:
            raise ConfigError(f"checkpoint.permanent_every={self.permanent_every} must be >= 0")


class CheckpointWriter:
    """Saves states of one run; at most one write in flight. Use as a context manager.

    In async mode `save` returns once the tensors are copied; the write, the manifest, the atomic
    rename and the pruning of old checkpoints happen on a background thread. A failure there is
    raised (as CheckpointError) by the next `save` or by `wait`.
    """

    def __init__(
        self, run_dir: str | os.PathLike, cfg: CheckpointConfig, group: dist.ProcessGroup | None = None
    ):
        self.run_dir, self.cfg, self.group = Path(run_dir), cfg, group
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if cfg.async_save else None
        )
        self._pending: Future | None = None
        self._pending_dir = self.run_dir
        self.last_saved_step: int | None = None
        self.blocking_s = 0.0
        """Total time `save` and `wait` kept the caller waiting."""

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.cfg.interval > 0 and step % self.cfg.interval == 0)

    def save(self, state: TrainState) -> None:
        start = time.perf_counter()
        self.wait()
        directory = checkpoint_path(self.run_dir, state.step)
        future, manifest = begin_save(
            directory, state, asynchronous=self._executor is not None, group=self.group
        )
        if future is None:
            self._finish(directory, manifest)
        else:
            self._pending = self._executor.submit(self._finish_async, future, directory, manifest)
            self._pending_dir = directory
        self.last_saved_step = state.step
        self.blocking_s += time.perf_counter() - start

    def _finish_async(self, future: Future, directory: Path, manifest: dict) -> None:
        future.result()
        self._finish(directory, manifest)

    def _finish(self, directory: Path, manifest: dict) -> None:
        finish_save(directory, manifest, group=self.group)
        if rank(self.group) == 0:
            prune_checkpoints(
                self.run_dir, keep_last=self.cfg.keep_last, permanent_every=self.cfg.permanent_every
            )

    def wait(self) -> None:
        """Block until the write in flight (if any) is complete; raise its failure."""
        if self._pending is None:
            return
        start = time.perf_counter()
        pending, self._pending = self._pending, None
        try:
            pending.result()
        except CheckpointError:
            raise
        except BaseException as exc:
            raise save_failure(self._pending_dir, exc) from exc
        finally:
            self.blocking_s += time.perf_counter() - start

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
