"""Gradient clipping by global norm."""

from __future__ import annotations

import torch


@torch.no_grad()
def clip_by_global_norm(
    grads: list[torch.Tensor], max_norm: float | None, *, norm: torch.Tensor | None = None
) -> torch.Tensor:
    """Scale `grads` in place so their joint L2 norm is at most `max_norm`; return the norm before.

    Matches ``torch.nn.utils.clip_grad_norm_``: scale ``min(1, max_norm / (norm + 1e-6))``.
    `max_norm` None (or <= 0) only measures. The norm is a 0-dim tensor in at least fp32 (no host sync).
    `norm`: the joint norm when the caller computed it (for sharded gradients, over every rank's
    shards, with `grads` this rank's local shards).
    """
    if norm is None:
        wide = torch.promote_types(grads[0].dtype, torch.float32)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, dtype=wide)))
    if max_norm is not None and max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale)
    return norm
