"""CPU intra-op threads: chosen from the cores other processes leave idle, overridable, reported."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import olmo_fn.runtime as runtime
from olmo_fn.runtime import busy_cores, choose_cpu_threads


def test_explicit_choices_win(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_cpu_threads(3) == runtime.CpuThreads(3, "--threads")
    assert choose_cpu_threads(None).reason == "OMP_NUM_THREADS"


@pytest.mark.parametrize(
    ("busy", "usable", "threads"),
    [(0.05, 2, 2), (1.0, 2, 1), (1.6, 2, 1), (0.4, 4, 4), (2.6, 4, 1), (1.4, 4, 3)],
)
def test_threads_are_the_cores_left_idle(monkeypatch, busy, usable, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "busy_cores", lambda: busy)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(usable)))
    chosen = choose_cpu_threads(None)
    assert chosen.threads == threads and f"{busy:.1f} of" in chosen.reason


def test_without_proc_stat_torch_decides(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "busy_cores", lambda: None)
    assert choose_cpu_threads(None).reason == "torch default"


def test_busy_cores_sees_another_busy_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(0.5) > 0.6
    finally:
        spinner.kill()
        spinner.wait()
