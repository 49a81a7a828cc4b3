"""Attention masks: causal within documents (optionally within a sliding window), from document ids.

Document ids come from the data (``olmo_fn.io.instances``): within each row they never decrease, and
every token of a document shares its id. A sliding window of W lets a query see itself and the W-1
tokens before it (0 = no window). Two forms of the same mask:

- `document_causal_mask`: a dense boolean (batch, 1, seq, seq) tensor for
  ``scaled_dot_product_attention`` (the CPU path, where FlexAttention has no backward).
- `document_block_mask`: a FlexAttention ``BlockMask`` built directly from block-level document
  ranges — no ``create_block_mask`` tracing, so rebuilding it per batch costs about a millisecond.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_causal_mask(doc_ids: torch.Tensor, window: int = 0) -> torch.Tensor:
    """doc_ids: (batch, seq) int -> bool (batch, 1, seq, seq); True where query may attend to key."""
    seq = doc_ids.shape[1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    visible = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    if window:
        visible = visible.triu(-(window - 1))
    return (same_doc & visible)[:, None]


def _block_ranges(doc_ids: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of `block_size` tokens: the smallest and largest document id, each (batch, n_blocks)."""
    blocks = doc_ids.view(doc_ids.shape[0], -1, block_size)
    return blocks.amin(-1), blocks.amax(-1)


def document_block_mask(doc_ids: torch.Tensor, block_size: int = 128, window: int = 0):
    """A FlexAttention BlockMask equal to `document_causal_mask(doc_ids, window)`.

    doc_ids: (batch, seq) int, non-decreasing along seq. A (query block i, key block j) pair is
    *partial* (needs the per-token mask) when some of its pairs are allowed and *full* when all are:
    j < i, both blocks inside one document, and (with a window) even the farthest pair within it.
    Sequence lengths that are not a multiple of `block_size` are padded by repeating the last id;
    padded positions are never attended.
    """
    from torch.nn.attention.flex_attention import BlockMask

    seq = doc_ids.shape[1]
    pad = (-seq) % block_size
    padded = F.pad(doc_ids, (0, pad), mode="replicate") if pad else doc_ids
    lo, hi = _block_ranges(padded, block_size)
    n_blocks = lo.shape[1]
    q_lo, q_hi = lo[:, :, None], hi[:, :, None]
    k_lo, k_hi = lo[:, None, :], hi[:, None, :]
    block_idx = torch.arange(n_blocks, device=doc_ids.device)
    below = block_idx[None, :, None] > block_idx[None, None, :]
    diagonal = block_idx[None, :, None] == block_idx[None, None, :]
    overlaps = (k_hi >= q_lo) & (k_lo <= q_hi)
    full = below & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    if window:
        gap = (block_idx[None, :, None] - block_idx[None, None, :]) * block_size  # query start - key start
        overlaps = overlaps & (gap - (block_size - 1) < window)  # nearest pair inside the window
        full = full & (gap + (block_size - 1) < window)  # farthest pair inside the window
    partial = ((below & overlaps) | diagonal) & ~full

    def to_indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = selected.sum(-1, dtype=torch.int32)
        # Stable sort puts the selected key blocks first, in increasing order.
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[:, None], order[:, None]

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)

    def mask_mod(b, h, q, kv):
        visible = (padded[b, q] == padded[b, kv]) & (q >= kv)
        return visible & (q - kv < window) if window else visible

    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(seq, seq),
    )
