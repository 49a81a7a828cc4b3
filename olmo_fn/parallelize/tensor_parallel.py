"""Tensor + sequence parallelism: the same model, computed by ``tp`` ranks from local shards.

Each tp rank holds some attention heads, some MLP hidden units and some vocabulary rows (the compute
layout of `plan.default_plan`). Between the matmuls the residual stream is split along the sequence
(sequence parallel), so norms and residual adds run on ``seq / tp`` positions per rank. The blocks are
the formulas of `olmo_fn.graph.block` written out with the collectives they need under this split:

    x_full = gather_seq(x)                         # all positions, for the local heads / units
    a = reduce_scatter_seq(attention_local(x_full))  # partial sums over ranks -> own positions
    h = x + rms_norm(a)                            # OLMo 2 (reordered norm); Llama: pre-norm
    out = h + rms_norm(reduce_scatter_seq(gated_mlp(gather_seq(h))))

OLMo 2's QK-norm normalises the *whole* q and k projections, so its mean of squares is summed over
the tp ranks (exact, not per shard). The embedding and the loss are vocabulary-parallel: no rank ever
holds the full logits.

Every rank computes the same (replicated) loss; each collective's backward is what makes the
gradients of that one loss exact: a value all ranks use alike needs no reduction of its gradient,
a value each rank uses for different heads or rows needs its gradient summed. The property suite
(tests/property) checks every gradient against one process in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from olmo_fn.graph.attention import attend
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.feed_forward import gated_mlp
from olmo_fn.graph.linear import linear
from olmo_fn.graph.loss import IGNORE_INDEX
from olmo_fn.graph.model import AttentionBackend, BlockFn, LayerInputs, layer_inputs
from olmo_fn.graph.norms import rms_norm
from olmo_fn.graph.rope import apply_rope
from olmo_fn.parallelize.axis_group import AxisGroup
from olmo_fn.parallelize.context_parallel import gather_keys
from olmo_fn.parallelize.recomputed_chunks import recomputed_chunk_sums
from olmo_fn.parallelize.split_collectives import gather_along, reduce_scatter_along

# ---- the collectives, each with the backward that keeps gradients exact -------------------------


class _SumUsedApart(torch.autograd.Function):
    """A sum over ranks that each rank then uses differently (e.g. a norm statistic scaling its own
    heads): forward all-reduce, backward all-reduce of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
        ctx.tp = tp
        out = x.clone()
        dist.all_reduce(out, group=tp.group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.tp.group)
        return grad, None


class _SumUsedAlike(torch.autograd.Function):
    """A sum over ranks that every rank then uses identically (the loss terms): forward all-reduce,
    backward identity (each rank's gradient of the one loss is already the whole gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=tp.group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def gather_seq(x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    """(batch, seq / tp, d) -> (batch, seq, d); backward: reduce-scatter."""
    return gather_along(x, tp, 1)


def reduce_scatter_seq(x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    """(batch, seq, d) partial sums -> (batch, seq / tp, d) sums; backward: all-gather."""
    return reduce_scatter_along(x, tp, 1)


# ---- the model, on local shards --------------------------------------------------------------------


def rms_norm_across(
    x: torch.Tensor, weight: torch.Tensor, eps: float, full_dim: int, tp: AxisGroup
) -> torch.Tensor:
    """`rms_norm` of a tensor whose last dimension is split across the tp ranks: the mean of squares
    is taken over all ``full_dim`` elements. x: (..., full_dim / tp); weight: this rank's slice."""
    wide = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(wide)
    squares = _SumUsedApart.apply(xw.pow(2).sum(-1, keepdim=True), tp)
    normed = xw * torch.rsqrt(squares / full_dim + eps)
    return (weight.to(wide) * normed).to(x.dtype)


def attention_local(
    p: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    rope,
    mask: Any,
    cfg: ModelConfig,
    tp: AxisGroup,
    cp: AxisGroup | None = None,
):
    """`graph.attention.attention` over this rank's heads: x (batch, seq, d_model) all positions ->
    (batch, seq, d_model) partial sums (this rank's heads through its columns of w_out). With `cp`,
    x is this rank's context-parallel slice and the keys and values come from every cp rank."""
    batch, seq, _ = x.shape
    heads, kv_heads = cfg.n_heads // tp.size, cfg.n_kv_heads // tp.size
    q, k, v = linear(x, p["w_q"]), linear(x, p["w_k"]), linear(x, p["w_v"])
    if cfg.qk_norm and cfg.qk_norm_scope == "all_heads":
        q = rms_norm_across(q, p["q_norm"], cfg.norm_eps, cfg.n_heads * cfg.d_head, tp)
        k = rms_norm_across(k, p["k_norm"], cfg.norm_eps, cfg.n_kv_heads * cfg.d_head, tp)
    q, k = q.view(batch, seq, heads, cfg.d_head), k.view(batch, seq, kv_heads, cfg.d_head)
    if cfg.qk_norm and cfg.qk_norm_scope == "per_head":  # local heads, weights replicated over tp
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    cos, sin = rope
    q = apply_rope(q, cos, sin).transpose(1, 2)
    k = apply_rope(k, cos, sin).transpose(1, 2)
    v = v.view(batch, seq, kv_heads, cfg.d_head).transpose(1, 2)
    if cp is not None:
        k, v = gather_keys(k, cp), gather_keys(v, cp)
    out = attend(q, k, v, mask)
    return linear(out.transpose(1, 2).reshape(batch, seq, heads * cfg.d_head), p["w_out"])


def tp_block_fn(cfg: ModelConfig, tp: AxisGroup, cp: AxisGroup | None = None) -> BlockFn:
    """The block `cfg.block` names, on local shards; x and the result are (batch, seq / tp, d_model)
    (of this rank's context-parallel slice, with `cp`)."""

    def attn(p, x_seq, rope, mask):
        return reduce_scatter_seq(
            attention_local(p["attention"], gather_seq(x_seq, tp), rope, mask, cfg, tp, cp), tp
        )

    def mlp(p, x_seq):
        return reduce_scatter_seq(gated_mlp(p["feed_forward"], gather_seq(x_seq, tp), cfg.mlp_activation), tp)

    def reordered_norm(p, x, rope, mask, cfg):
        h = x + rms_norm(attn(p, x, rope, mask), p["attention_norm"], cfg.norm_eps)
        return h + rms_norm(mlp(p, h), p["feed_forward_norm"], cfg.norm_eps)

    def pre_norm(p, x, rope, mask, cfg):
        h = x + attn(p, rms_norm(x, p["attention_norm"], cfg.norm_eps), rope, mask)
        return h + mlp(p, rms_norm(h, p["feed_forward_norm"], cfg.norm_eps))

    return reordered_norm if cfg.block == "reordered_norm" else pre_norm


def vocab_parallel_embedding(ids: torch.Tensor, rows: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    """Embeddings of `ids` from this rank's vocabulary rows, summed over ranks and split along the
    sequence: (batch, seq) -> (batch, seq / tp, d_model)."""
    first = tp.rank * rows.shape[0]
    local = ids - first
    mine = (local >= 0) & (local < rows.shape[0])
    partial = F.embedding(torch.where(mine, local, 0), rows) * mine[..., None].to(rows.dtype)
    return reduce_scatter_seq(partial, tp)


def vocab_parallel_cross_entropy_sums(
    logits: torch.Tensor, labels: torch.Tensor, tp: AxisGroup, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`graph.loss.cross_entropy_sums` from this rank's vocabulary columns of the logits.

    logits: (batch, seq, vocab / tp); labels: (batch, seq) global ids. Only per-position statistics
    cross ranks (the max, the sum of exponentials, the target's logit), never the logits themselves.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    first = tp.rank * logits.shape[-1]
    valid = labels != ignore_index
    peak = logits.detach().amax(-1, keepdim=True)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp.group)
    total = _SumUsedAlike.apply(torch.exp(logits - peak).sum(-1), tp)
    lse = peak.squeeze(-1) + torch.log(total)
    local = labels - first
    mine = valid & (local >= 0) & (local < logits.shape[-1])
    picked = logits.gather(-1, torch.where(mine, local, 0)[..., None]).squeeze(-1)
    target = _SumUsedAlike.apply(torch.where(mine, picked, torch.zeros_like(picked)), tp)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    ce_sum = torch.where(valid, lse - target, zero).sum()
    z_sum = torch.where(valid, lse.square(), zero).sum()
    return ce_sum, z_sum, valid.sum()


def vocab_parallel_linear_cross_entropy_sums(
    h: torch.Tensor,
    w_out: torch.Tensor,
    labels: torch.Tensor,
    tp: AxisGroup,
    chunk_tokens: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`vocab_parallel_cross_entropy_sums` of ``h @ w_out.T``, made `chunk_tokens` positions at a time.

    h: (batch, seq, d_model), every position; w_out: (vocab / tp, d_model), this rank's rows; labels:
    (batch, seq) global ids. Each chunk's logits are recomputed in backward instead of kept, so a rank
    never holds more than one chunk's logits (or their gradient) at once; the collectives of a chunk
    run again in its recomputation, in the same order on every rank. None: all positions at once.
    """

    def sums(logits, labels_chunk):
        return vocab_parallel_cross_entropy_sums(logits, labels_chunk, tp, ignore_index)

    return recomputed_chunk_sums(h, w_out, labels, chunk_tokens, sums)


def tp_loss_sums(
    params: Mapping[str, Any],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    cfg: ModelConfig,
    tp: AxisGroup,
    *,
    block_fn: BlockFn,
    positions: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    backend: AttentionBackend = "auto",
    inputs: LayerInputs | None = None,
    loss_chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`graph.model.loss_sums` under tensor + sequence parallelism (same arguments, plus `tp`).

    params: the model view in compute layout (this rank's shards); block_fn: `tp_block_fn`, possibly
    wrapped to gather each block's parameters first. The results are the same on every tp rank.
    """
    blocks = params["blocks"]
    layers = sorted(blocks.keys(), key=int)
    if inputs is None:
        inputs = layer_inputs(input_ids, cfg, [int(key) for key in layers], positions, doc_ids, backend)
    rope, masks = inputs
    x = vocab_parallel_embedding(input_ids, params["embeddings"], tp)
    for key in layers:
        x = block_fn(blocks[key], x, rope, masks[int(key)], cfg)
    w_out = params["embeddings"] if cfg.tie_embeddings else params["lm_head"]["w_out"]
    h = gather_seq(rms_norm(x, params["lm_head"]["norm"], cfg.norm_eps), tp)
    return vocab_parallel_linear_cross_entropy_sums(h, w_out, labels, tp, loss_chunk_tokens)
