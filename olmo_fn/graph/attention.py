"""Multi-head and grouped-query self-attention with OLMo 2 QK-norm and RoPE."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.linear import linear
from olmo_fn.graph.norms import rms_norm
from olmo_fn.graph.rope import apply_rope


@functools.cache
def _compiled_flex_attention():
    # FlexAttention only becomes a fused kernel when compiled; inside an already compiled block this
    # call is inlined into that graph.
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
    """Scaled dot-product attention, softmax scale 1/sqrt(d_head).

    q: (batch, n_heads, seq, d_head); k, v: (batch, n_kv_heads, seq, d_head), n_kv_heads dividing
    n_heads. `mask` selects the backend: ``None`` plain causal (SDPA), a bool tensor broadcastable to
    (batch, n_heads, seq, seq) with True = attend (SDPA), or a FlexAttention ``BlockMask`` (flex).
    Returns (batch, n_heads, seq, d_head).
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    # Inside a compiled region flex_attention is traced directly; called eagerly on CUDA it goes
    # through its own compiled wrapper (eager flex materializes the whole score matrix).
    eager_cuda = q.is_cuda and not torch.compiler.is_compiling()
    flex = _compiled_flex_attention() if eager_cuda else flex_attention
    return flex(q, k, v, block_mask=mask, enable_gqa=gqa)


AttentionFn = Callable[
    [Mapping[str, torch.Tensor], torch.Tensor, tuple[torch.Tensor, torch.Tensor], Any, ModelConfig],
    torch.Tensor,
]
"""The signature of `attention`: what the blocks call for their attention sublayer (a KV-cached
attention from `olmo_fn.graph.decode` is injected the same way)."""


def project_qkv(
    p: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    cfg: ModelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of `x`, QK-normed and rotated, split into heads.

    p, x, rope as for `attention`. QK-norm normalizes the whole q and k projections before they are
    split into heads (``cfg.qk_norm_scope`` all_heads), or each head on its own (per_head).
    Returns q: (batch, n_heads, seq, d_head); k, v: (batch, n_kv_heads, seq, d_head).
    """
    batch, seq, _ = x.shape
    q = linear(x, p["w_q"])
    k = linear(x, p["w_k"])
    v = linear(x, p["w_v"])
    if cfg.qk_norm and cfg.qk_norm_scope == "all_heads":
        q = rms_norm(q, p["q_norm"], cfg.norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.norm_eps)
    q = q.view(batch, seq, cfg.n_heads, cfg.d_head)
    k = k.view(batch, seq, cfg.n_kv_heads, cfg.d_head)
    if cfg.qk_norm and cfg.qk_norm_scope == "per_head":
        q = rms_norm(q, p["q_norm"], cfg.norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.norm_eps)
    v = v.view(batch, seq, cfg.n_kv_heads, cfg.d_head)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def project_out(p: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Merge the heads of `attend`'s output (batch, n_heads, seq, d_head) and apply ``w_out``:
    returns (batch, seq, d_model)."""
    batch, n_heads, seq, d_head = out.shape
    return linear(out.transpose(1, 2).reshape(batch, seq, n_heads * d_head), p["w_out"])


def attention(
    p: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: Any,
    cfg: ModelConfig,
) -> torch.Tensor:
    """Self-attention sublayer (no residual, no output norm).

    p: ``w_q, w_k, w_v, w_out`` and, with ``cfg.qk_norm``, ``q_norm, k_norm`` (see param_tree).
    x: (batch, seq, d_model); rope: fp32 (cos, sin) from `rope_tables`; mask: as for `attend`.
    Returns (batch, seq, d_model).
    """
    q, k, v = project_qkv(p, x, rope, cfg)
    return project_out(p, attend(q, k, v, mask))
