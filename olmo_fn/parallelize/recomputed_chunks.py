"""The LM head and loss made chunk by chunk of positions, each chunk's logits recomputed in backward
through `torch.utils.checkpoint` (so only one chunk's logits, or their gradient, exist at a time).

Single-process training uses `olmo_fn.graph.loss.linear_cross_entropy_sums`, a custom autograd
function that keeps each position's logsumexp and makes the logits once more in backward. Under
plans the chunks go through checkpoint instead: the vocabulary-parallel loss runs collectives inside
each chunk, which recomputation repeats in the same order on every rank; and a zero-bubble pipeline
schedule splits the backward into an input pass and a weight pass, whose weight pass (torch 2.11,
measured) cannot start from the output of a custom function that takes the weight itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

ChunkSums = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``sums(logits_chunk, labels_chunk) -> (ce_sum, z_sum, n_targets)``."""


def recomputed_chunk_sums(
    h: torch.Tensor, w_out: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None, sums: ChunkSums
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sums` of ``h @ w_out.T`` and `labels`, added up over chunks of `chunk_tokens` positions
    (None or 0: all positions at once, nothing recomputed).

    h: (..., d_model), every position; w_out: (vocab or this rank's share, d_model); labels: (...).
    The last chunk may be shorter."""
    if not chunk_tokens:
        return sums(h @ w_out.T, labels)
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)

    def chunk_sums(h_chunk, w, labels_chunk):
        return sums(h_chunk @ w.T, labels_chunk)

    parts = [
        checkpoint(
            chunk_sums, h[i : i + chunk_tokens], w_out, labels[i : i + chunk_tokens], use_reentrant=False
        )
        for i in range(0, h.shape[0], chunk_tokens)
    ]
    ce, z, n = (torch.stack(values).sum() for values in zip(*parts, strict=True))
    return ce, z, n
