"""The torch profiler over a range of updates: a Chrome trace and a table of the costliest operators.

`StepProfiler.wrap` returns the train step unchanged in what it computes: outside the range it is
the step itself; inside, the same call under the profiler, labelled ``olmo_fn step N``. The trace is
written when step LAST ends (or the run, if earlier). A profiler that fails to start or to write is
reported in one line and disabled; training goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from olmo_fn.callbacks.observer import Observer
from olmo_fn.errors import one_line
from olmo_fn.state.train_step import StepFn

PROFILE_DIR = "profile"
STEP_LABEL = "olmo_fn step {}"


class StepProfiler(Observer):
    name = "profiler"

    def __init__(
        self,
        first: int,
        last: int,
        run_dir: str | Path,
        device: torch.device,
        *,
        rank: int | None = None,
        verbose: bool = True,
    ):
        self.first, self.last, self.device, self.verbose = first, last, device, verbose
        stem = f"steps{first}-{last}" + (f"-rank{rank}" if rank is not None else "")
        self.trace_path = Path(run_dir) / PROFILE_DIR / f"{stem}.json"
        self.table_path = self.trace_path.with_suffix(".txt")
        self._profile: profile | None = None
        self._failed = False
        self._profiled: list[int] = []

    def wrap(self, step_fn: StepFn) -> StepFn:
        def profiled_step(state, batch):
            step = state.step + 1
            if self._failed or not self.first <= step <= self.last:
                return step_fn(state, batch)
            if self._profile is None:
                self._guard(self._start)
            with record_function(STEP_LABEL.format(step)):
                out = step_fn(state, batch)
            self._profiled.append(step)
            if step == self.last:
                self._guard(self._stop)
            return out

        return profiled_step

    def on_end(self, summary: dict[str, Any]) -> None:
        self._guard(self._stop)  # the run ended inside the range

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profile = profile(activities=activities)
        self._profile.start()

    def _stop(self) -> None:
        if self._profile is None:
            return
        prof, self._profile = self._profile, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.stop()
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace_path))
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        steps = f"{self._profiled[0]}-{self._profiled[-1]}" if self._profiled else "none"
        self.table_path.write_text(f"olmo_fn profile of steps {steps}\n{table}\n")
        if self.verbose:
            print(
                f"profiled steps {steps}: {self.trace_path} (chrome://tracing or Perfetto), "
                f"top operators in {self.table_path}",
                file=sys.stderr,
                flush=True,
            )

    def _guard(self, action) -> None:
        try:
            action()
        except Exception as exc:
            self._failed, self._profile = True, None
            print(
                f"observer profiler failed: {one_line(exc)}; it is disabled, training goes on unprofiled",
                file=sys.stderr,
                flush=True,
            )
