"""Transformer blocks: OLMo 2/3 reordered-norm and Llama pre-norm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from olmo_fn.graph.attention import AttentionFn, attention
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.feed_forward import gated_mlp
from olmo_fn.graph.norms import rms_norm


def reordered_norm_block(
    p: Mapping[str, Any],
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: Any,
    cfg: ModelConfig,
    attention_fn: AttentionFn = attention,
) -> torch.Tensor:
    """OLMo 2 block: ``h = x + norm(attn(x)); out = h + norm(mlp(h))``, mlp the gated MLP of
    ``cfg.mlp_activation``.

    p: one ``blocks.{i}`` subtree. x: (batch, seq, d_model) -> same shape and dtype.
    attention_fn computes ``attn`` (default `attention`; generation passes a KV-cached one).
    """
    h = x + rms_norm(attention_fn(p["attention"], x, rope, mask, cfg), p["attention_norm"], cfg.norm_eps)
    mlp = gated_mlp(p["feed_forward"], h, cfg.mlp_activation)
    return h + rms_norm(mlp, p["feed_forward_norm"], cfg.norm_eps)


def pre_norm_block(
    p: Mapping[str, Any],
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: Any,
    cfg: ModelConfig,
    attention_fn: AttentionFn = attention,
) -> torch.Tensor:
    """Llama block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``.

    Uses the same parameter names as the reordered-norm block: ``attention_norm`` is applied before
    attention and ``feed_forward_norm`` before the MLP. attention_fn as for `reordered_norm_block`.
    """
    h = x + attention_fn(p["attention"], rms_norm(x, p["attention_norm"], cfg.norm_eps), rope, mask, cfg)
    return h + gated_mlp(
        p["feed_forward"], rms_norm(h, p["feed_forward_norm"], cfg.norm_eps), cfg.mlp_activation
    )


BLOCKS = {"reordered_norm": reordered_norm_block, "pre_norm": pre_norm_block}


def block_for(cfg: ModelConfig):
    """The block function `cfg.block` names."""
    return BLOCKS[cfg.block]
