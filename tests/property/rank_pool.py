"""A persistent pool of forked gloo processes, one per rank, that runs a job on every rank at once.

Starting a process group costs seconds; a pool started once per world size and fed jobs through
queues runs thousands of small multi-rank checks a minute (../shared/TESTING.md). Any failure or
timeout kills the whole pool and starts a new one, so a rank stuck in a collective never hangs the
suite, and the next job starts clean.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

JOB_TIMEOUT_S = 120
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)


def _serve(rank: int, world: int, store_path: str, jobs, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # tiny shapes; and no OpenMP team inherited across fork
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args = job
        try:
            results.put((rank, True, fn(rank, world, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    os._exit(0)  # no gloo teardown: the parent is going away too


class RankPool:
    """`run(fn, *args)` calls ``fn(rank, world, *args)`` on every rank and returns the results by rank."""

    def __init__(self, world: int):
        self.world = world
        self._procs: list = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        fd, self._store = tempfile.mkstemp(prefix="olmo_fn-pool-")
        os.close(fd)
        os.unlink(self._store)
        self._jobs = [ctx.Queue() for _ in range(self.world)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_serve, args=(r, self.world, self._store, self._jobs[r], self._results), daemon=True
            )
            for r in range(self.world)
        ]
        for proc in self._procs:
            proc.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = JOB_TIMEOUT_S) -> list[Any]:
        for jobs in self._jobs:
            jobs.put((fn, args))
        results: dict[int, Any] = {}
        errors = []
        try:
            while len(results) + len(errors) < self.world:
                # Once a rank failed, the others may be stuck in a collective: do not wait long for them.
                rank, ok, value = self._results.get(timeout=5 if errors else timeout)
                if ok:
                    results[rank] = value
                else:
                    errors.append(f"rank {rank}:\n{value}")
        except queue.Empty:
            errors.append(
                f"no answer from ranks {sorted(set(range(self.world)) - set(results))} in {timeout} s"
            )
        if errors:
            self.restart()
            raise AssertionError("\n".join(errors))
        return [results[r] for r in range(self.world)]

    def restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> None:
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.join(timeout=10)
        self._procs = []
        if os.path.exists(self._store):
            os.unlink(self._store)
