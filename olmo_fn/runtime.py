"""Resolving "auto" choices (device, dtype, compile) against the machine a run is on."""

from __future__ import annotations

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


def resolve_compile(choice: str, device: torch.device) -> bool:
    """ "auto" -> compile on CUDA only (on CPU a cold compile costs more than a short run gains)."""
    return device.type == "cuda" if choice == "auto" else choice == "on"


def device_name(device: torch.device) -> str:
    """A human-readable name of the device, e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"
