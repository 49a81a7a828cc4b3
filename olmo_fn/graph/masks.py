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


def _indices(doc_ids: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return torch.arange(doc_ids.shape[1], device=doc_ids.device) if index is None else index


def document_causal_mask(
    doc_ids: torch.Tensor,
    window: int = 0,
    q_index: torch.Tensor | None = None,
    kv_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """doc_ids: (batch, seq) int -> bool (batch, 1, n_q, n_kv); True where query may attend to key.

    q_index, kv_index: (n_q,), (n_kv,) int positions in the row of the queries and the keys, in the
    order attention sees them (default ``0..seq-1``): a context-parallel slice of the queries, and the
    keys gathered from every rank.
    """
    q = _indices(doc_ids, q_index)
    kv = _indices(doc_ids, kv_index)
    same_doc = doc_ids[:, q, None] == doc_ids[:, None, kv]
    gap = q[:, None] - kv[None, :]
    visible = gap >= 0
    if window:
        visible = visible & (gap < window)
    return (same_doc & visible)[:, None]


def _block_ranges(values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of `block_size` entries along the last dim: the smallest and largest value."""
    blocks = values.unflatten(-1, (-1, block_size))
    return blocks.amin(-1), blocks.amax(-1)


def _pad(values: torch.Tensor, pad: int) -> torch.Tensor:
    """Repeat the last entry `pad` times along the last dim (padded positions are never attended)."""
    return torch.cat([values, values[..., -1:].expand(*values.shape[:-1], pad)], -1) if pad else values


def document_block_mask(
    doc_ids: torch.Tensor,
    block_size: int = 128,
    window: int = 0,
    q_index: torch.Tensor | None = None,
    kv_index: torch.Tensor | None = None,
):
    """A FlexAttention BlockMask equal to `document_causal_mask(doc_ids, window, q_index, kv_index)`.

    doc_ids: (batch, seq) int, non-decreasing along seq. A (query block, key block) pair is *full*
    when every pair in it is allowed: both blocks inside one document, every query at or after every
    key, and (with a window) even the farthest pair within it; *partial* (the per-token mask decides)
    when its document ranges overlap and its nearest pair is causal and within the window. Lengths
    that are not a multiple of `block_size` are padded by repeating the last entry; padded positions
    are never attended.
    """
    from torch.nn.attention.flex_attention import BlockMask

    indexed = q_index is not None or kv_index is not None
    q_pos, kv_pos = _indices(doc_ids, q_index), _indices(doc_ids, kv_index)
    n_q, n_kv = q_pos.shape[0], kv_pos.shape[0]
    q_docs = _pad(doc_ids[:, q_pos], (-n_q) % block_size)
    kv_docs = _pad(doc_ids[:, kv_pos], (-n_kv) % block_size)
    q_pos, kv_pos = _pad(q_pos, (-n_q) % block_size), _pad(kv_pos, (-n_kv) % block_size)
    q_doc_lo, q_doc_hi = (r[:, :, None] for r in _block_ranges(q_docs, block_size))
    k_doc_lo, k_doc_hi = (r[:, None, :] for r in _block_ranges(kv_docs, block_size))
    q_lo, q_hi = (r[None, :, None] for r in _block_ranges(q_pos, block_size))
    k_lo, k_hi = (r[None, None, :] for r in _block_ranges(kv_pos, block_size))
    some = (k_doc_hi >= q_doc_lo) & (k_doc_lo <= q_doc_hi) & (q_hi >= k_lo)
    full = (q_doc_lo == q_doc_hi) & (k_doc_lo == k_doc_hi) & (q_doc_lo == k_doc_lo) & (q_lo >= k_hi)
    if window:
        some = some & (q_lo - k_hi < window)  # nearest pair inside the window
        full = full & (q_hi - k_lo < window)  # farthest pair inside the window
    full[:, :, -1] &= n_kv % block_size == 0  # a key block holding padding goes through the mask
    partial = some & ~full

    def to_indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = selected.sum(-1, dtype=torch.int32)
        # Stable sort puts the selected key blocks first, in increasing order.
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[:, None], order[:, None]

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)

    def mask_mod(b, h, q, kv):
        gap = q_pos[q] - kv_pos[kv] if indexed else q - kv
        visible = (q_docs[b, q] == kv_docs[b, kv]) & (gap >= 0)
        return visible & (gap < window) if window else visible

    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(n_q, n_kv),
    )
