"""Parameter initialization: deterministic from a seed, on any device, or shapes only on ``meta``."""

from __future__ import annotations

import hashlib

import torch
from tensordict import TensorDict

from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import param_shapes, unflatten


def empty_params(
    cfg: ModelConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TensorDict:
    """A parameter tree of uninitialised buffers: the template a checkpoint is read into."""
    return init_params(cfg, device="meta", dtype=dtype).apply(lambda t: torch.empty_like(t, device=device))


def path_seed(seed: int, path: str) -> int:
    """A 63-bit seed for one parameter, stable across runs, processes and parameter order."""
    digest = hashlib.blake2b(f"{seed}:{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_params(
    cfg: ModelConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TensorDict:
    """A fresh parameter tree: matrices ~ N(0, init_std²), norm weights = 1, expert biases = 0.

    Each parameter draws from its own generator seeded by ``(seed, path)``, so a parameter's values do
    not depend on which others exist or in which order they are built (pipeline stages and sharded
    inits see the same numbers). Values are identical for a given device type; CPU and CUDA
    generators differ. On ``meta`` only shapes and dtypes are made.
    """
    device = torch.device(device)
    flat = {}
    for path, shape in param_shapes(cfg).items():
        if device.type == "meta":
            flat[path] = torch.empty(shape, device=device, dtype=dtype)
        elif path.endswith(".expert_bias"):  # no preference until loads are seen
            flat[path] = torch.zeros(shape, device=device, dtype=dtype)
        elif len(shape) == 1:
            flat[path] = torch.ones(shape, device=device, dtype=dtype)
        else:
            gen = torch.Generator(device=device).manual_seed(path_seed(seed, path))
            values = torch.empty(shape, device=device, dtype=torch.float32)
            values.normal_(mean=0.0, std=cfg.init_std, generator=gen)
            flat[path] = values.to(dtype)
    return unflatten(flat)
