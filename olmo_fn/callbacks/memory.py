"""Memory figures added to every metrics record: cheap reads of counters the system keeps anyway."""

from __future__ import annotations

import resource
import sys

import torch

GIB = 2**30


def memory_metrics(device: torch.device) -> dict[str, float]:
    """``mem/max_rss_gib``: the process's peak resident memory so far (GiB); on CUDA also
    ``mem/cuda_peak_allocated_gib``: the peak of tensor memory allocated on `device` so far (GiB,
    the caching allocator's count, without its reserve). Neither synchronises the device."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux counts KiB, macOS bytes
    out = {"mem/max_rss_gib": rss_bytes / GIB}
    if device.type == "cuda":
        out["mem/cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out
