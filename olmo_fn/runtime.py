"""Resolving "auto" choices (device, dtype, compile, CPU threads) against the machine a run is on."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch

from olmo_fn.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else must name a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={name!r} is not a torch device (try auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available on this machine (use device=cpu)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" -> bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_compile(
    choice: str,
    device: torch.device,
    *,
    tensor_parallel: bool = False,
    expert_parallel: bool = False,
    ac: str = "none",
) -> bool:
    """ "auto" -> compile on CUDA only (on CPU a cold compile costs more than a short run gains), and
    wherever ``ac="budget"`` asks for the compiler's partitioner.

    Tensor- and expert-parallel blocks are not compiled yet: "auto" leaves them eager, "on" is refused."""
    eager_only = "parallel.tp > 1" if tensor_parallel else "parallel.ep > 1" if expert_parallel else None
    if ac == "budget" and (choice == "off" or eager_only):
        why = "compile=off" if choice == "off" else f"{eager_only} (which runs eagerly)"
        raise ConfigError(
            f"ac=budget is chosen by torch.compile's partitioner and cannot run with {why}; "
            "use --ac full or --ac selective"
        )
    if eager_only:
        if choice == "on":
            kind = "TP" if tensor_parallel else "EP"
            raise ConfigError(
                f"compile=on with {eager_only} is not supported yet (compile=auto runs {kind} eagerly)"
            )
        return False
    if choice == "auto":
        return device.type == "cuda" or ac == "budget"
    return choice in ("on", "step")


def run_compiles(cfg: Any, device: torch.device) -> bool:
    """`resolve_compile` for a run's (or a bench's) settings: its compile, parallel and ac fields."""
    return resolve_compile(
        cfg.compile,
        device,
        tensor_parallel=cfg.parallel.tp > 1,
        expert_parallel=cfg.parallel.ep > 1,
        ac=cfg.ac,
    )


def fp8_emulated(device: torch.device) -> bool:
    """Whether float8 matmuls must be emulated on `device`: everywhere but CUDA GPUs with float8
    tensor cores (compute capability 8.9 and up: Ada, Hopper, Blackwell)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) < (8, 9)


AUTO_LOSS_CHUNK_TOKENS = 4096
"""Positions per chunk of the LM head and loss when `resolve_loss_chunk` chooses to chunk."""
AUTO_LOSS_CHUNK_ABOVE = 2**26
"""Logits values per micro-batch (256 MiB in fp32) above which the loss is chunked by default."""


def resolve_loss_chunk(choice: int | None, tokens_per_micro_batch: int, vocab_size: int) -> int | None:
    """The loss's chunk size in positions, or None for all at once.

    choice None: chunks of `AUTO_LOSS_CHUNK_TOKENS` when a micro-batch's logits would hold more than
    `AUTO_LOSS_CHUNK_ABOVE` values (small models on short rows gain nothing from chunking); 0: never;
    n > 0: chunks of n positions. The same under every plan (tensor parallel: each chunk's logits hold
    the rank's vocabulary share; pipeline parallel: the last stage chunks).
    """
    if choice is None:
        big = tokens_per_micro_batch * vocab_size > AUTO_LOSS_CHUNK_ABOVE
        return AUTO_LOSS_CHUNK_TOKENS if big and tokens_per_micro_batch > AUTO_LOSS_CHUNK_TOKENS else None
    if choice < 0:
        raise ConfigError(f"loss_chunk_tokens={choice} must be >= 0 (0: never chunk; unset: auto)")
    return choice or None


@dataclasses.dataclass(frozen=True)
class CpuThreads:
    """The intra-op thread count a CPU run uses, and why."""

    threads: int
    reason: str


def busy_cores(window_s: float = 0.1) -> float | None:
    """Cores kept busy by other processes, measured from /proc/stat over `window_s` while this process
    sleeps; None where /proc/stat does not exist (not Linux)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0:
        return 0.0
    return (1 - (idle1 - idle0) / elapsed) * (os.cpu_count() or 1)


def choose_cpu_threads(requested: int | None) -> CpuThreads:
    """Intra-op threads for a CPU run: `requested`; else ``OMP_NUM_THREADS`` when set; else one per core
    this process may use that other processes do not keep busy (at least 1).

    Why: with every core already busy, torch's default of one thread per core collapses (on 2 cores
    with one other busy process the default run fell from 12.5k to 3.1k tokens/s, where 1 thread gave
    5.5k; BENCHMARKS.md), while on an idle machine all cores are worth it.
    """
    if requested is not None:
        return CpuThreads(requested, "--threads")
    if os.environ.get("OMP_NUM_THREADS"):
        return CpuThreads(torch.get_num_threads(), "OMP_NUM_THREADS")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:
        return CpuThreads(torch.get_num_threads(), "torch default")
    threads = max(1, min(usable, int(usable - busy + 0.5)))
    return CpuThreads(threads, f"{busy:.1f} of {os.cpu_count()} cores busy with other work")


def device_name(device: torch.device) -> str:
    """A human-readable name of the device, e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"
