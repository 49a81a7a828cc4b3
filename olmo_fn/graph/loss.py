"""Language-model losses: cross-entropy with an ignore index, and z-loss."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Label value of positions that carry no target (padding, the last position of an instance)."""


def cross_entropy_sums(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed losses over the target positions, for normalising by a whole batch's target count.

    logits: (..., vocab) any float dtype, computed in at least fp32; labels: (...) int, with
    `ignore_index` where there is no target.
    Returns fp32 scalars ``(ce_sum, z_sum, n_targets)``: the sum of ``logsumexp(logits) - logit[label]``,
    the sum of ``logsumexp(logits)²`` (z-loss), and the number of targets.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    ce_sum = torch.where(valid, lse - target, zero).sum()
    z_sum = torch.where(valid, lse.square(), zero).sum()
    return ce_sum, z_sum, valid.sum()
