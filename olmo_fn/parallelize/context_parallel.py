"""Context parallelism: every sequence split over ``cp`` ranks, the same model on each slice.

Load balance. Causal attention is uneven along the sequence (a query near the end sees many keys,
one near the start few), so a row is cut into ``2 × cp`` equal chunks and rank r holds chunks r and
``2 × cp - 1 - r``: one early and one late, equal work on every rank. Every cp rank reads the whole
rows; `context_parallel_slice` takes its two chunks of the ids, labels and RoPE positions.

Attention. Queries stay local; keys and values are all-gathered from every cp rank (their gradients
reduce-scattered back in backward), so each rank attends its queries to all keys. Which key a query
may see is decided by *positions in the row*, not by where a key sits in the gathered tensor: the
mask is built from the whole row's document ids, the rank's query positions and the gathered key
positions, so the document mask, causality across slice boundaries and sliding windows are exact.
RoPE is applied before the gather, with each token's own (per-document) position.

Loss. Each rank's labels are its slice's, so every target is counted once over the cp ranks; the
loss sums are added over ``dp × cp`` and normalised by the target count of the whole global batch.
Parameter gradients are partial sums over cp (each rank saw other positions) and are reduced with
the data-parallel ones (`plan.Rule.grad_placements`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol

from olmo_fn.graph.attention import AttentionFn, attend, project_out, project_qkv
from olmo_fn.graph.block import block_for
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.masks import document_block_mask, document_causal_mask
from olmo_fn.graph.model import AttentionBackend, BlockFn, LayerInputs
from olmo_fn.graph.rope import rope_tables
from olmo_fn.io.batch import Batch
from olmo_fn.parallelize.axis_group import AxisGroup
from olmo_fn.parallelize.split_collectives import gather_along

# Differentiable all-gather (backward: reduce-scatter) that torch.compile traces into its graph.
_traceable_all_gather = (
    getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
)


def slice_positions(seq: int, cp: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions in the row (``seq // cp``, int64) that cp rank `rank` holds: chunks `rank` and
    ``2 × cp - 1 - rank`` of ``2 × cp``."""
    chunk = seq // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, last])


def gathered_positions(seq: int, cp: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions in the row of the keys after the all-gather: every rank's slice, in rank order."""
    return torch.cat([slice_positions(seq, cp, rank, device) for rank in range(cp)])


def gather_keys(t: torch.Tensor, cp: AxisGroup) -> torch.Tensor:
    """(batch, heads, seq / cp, d_head) -> (batch, heads, seq, d_head) in `gathered_positions` order;
    backward: reduce-scatter. Compiled, the functional collective (in the graph); eager, the list
    collectives (the functional one's eager backward once segfaulted a gloo process, torch 2.13 CPU)."""
    if torch.compiler.is_compiling():
        return _traceable_all_gather(t.contiguous(), 2, cp.group)
    return gather_along(t, cp, 2)


def attention_over_slices(cp: AxisGroup) -> AttentionFn:
    """`graph.attention.attention` for a slice of the sequence: local queries, keys and values
    gathered from all cp ranks, and a mask from `context_parallel_slice`."""

    def attention(p: Mapping[str, torch.Tensor], x: torch.Tensor, rope, mask: Any, cfg: ModelConfig):
        q, k, v = project_qkv(p, x, rope, cfg)
        return project_out(p, attend(q, gather_keys(k, cp), gather_keys(v, cp), mask))

    return attention


def context_parallel_block(cfg: ModelConfig, cp: AxisGroup) -> BlockFn:
    """The block `cfg.block` names, with attention over the cp ranks' slices."""
    return functools.partial(block_for(cfg), attention_fn=attention_over_slices(cp))


def context_parallel_slice(
    mb: Batch,
    cfg: ModelConfig,
    cp: AxisGroup,
    *,
    document_masking: bool,
    backend: AttentionBackend = "auto",
) -> tuple[Batch, LayerInputs]:
    """This rank's slice of every row of `mb`, and what its blocks take besides x: the RoPE tables of
    its positions and each layer's mask of its queries against all keys.

    mb: whole rows (batch, seq), seq divisible by ``2 × cp``. Without `document_masking` a row is one
    document and positions count from its start. backend as for `graph.model.attention_mask`.
    """
    seq = mb.input_ids.shape[1]
    device = mb.input_ids.device
    mine = slice_positions(seq, cp.size, cp.rank, device)
    keys = gathered_positions(seq, cp.size, device)
    local = Batch(*(t[:, mine] for t in dataclasses.astuple(mb)))
    if document_masking:
        doc_ids, positions = mb.doc_ids, local.positions
    else:
        doc_ids, positions = torch.zeros_like(mb.doc_ids), mine.expand_as(local.input_ids)
    rope = rope_tables(positions, cfg.d_head, cfg.rope_theta, cfg.rope_scaling)
    if backend == "auto":
        backend = "flex" if device.type == "cuda" else "sdpa"
    windows = {layer: cfg.layer_window(layer) for layer in range(cfg.n_layers)}
    build = document_block_mask if backend == "flex" else document_causal_mask
    by_window = {w: build(doc_ids, window=w, q_index=mine, kv_index=keys) for w in set(windows.values())}
    return local, (rope, {layer: by_window[w] for layer, w in windows.items()})
