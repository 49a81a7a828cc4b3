"""Transformer blocks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from olmo_fn.graph.attention import attention
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.feed_forward import swiglu
from olmo_fn.graph.norms import rms_norm


def reordered_norm_block(
    p: Mapping[str, Any],
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: Any,
    cfg: ModelConfig,
) -> torch.Tensor:
    """OLMo 2 block: ``h = x + norm(attn(x)); out = h + norm(mlp(h))``.

    p: one ``blocks.{i}`` subtree. x: (batch, seq, d_model) -> same shape and dtype.
    """
    h = x + rms_norm(attention(p["attention"], x, rope, mask, cfg), p["attention_norm"], cfg.norm_eps)
    return h + rms_norm(swiglu(p["feed_forward"], h), p["feed_forward_norm"], cfg.norm_eps)
