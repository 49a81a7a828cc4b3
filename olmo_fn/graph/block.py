"""Transformer blocks: OLMo 2/3 reordered-norm and Llama pre-norm, each with a dense or an MoE
feed-forward (the parameter subtree says which: an MoE feed-forward has a ``router``).

A block returns x, or ``(x, aux)`` when its feed-forward is MoE (`olmo_fn.graph.moe.MoeAux`: the
auxiliary-loss sums and expert loads); `block_output` reads either. Like `attention_fn`, the MoE
feed-forward is injected (`moe_fn`, default `moe_feed_forward`): expert parallelism passes one that
sends tokens to the ranks holding their experts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from olmo_fn.graph.attention import AttentionFn, attention
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.feed_forward import gated_mlp
from olmo_fn.graph.moe import MoeAux, moe_feed_forward
from olmo_fn.graph.moe_config import MoeConfig
from olmo_fn.graph.norms import rms_norm

MoeFn = Callable[[Mapping[str, Any], torch.Tensor, MoeConfig, str], tuple[torch.Tensor, MoeAux]]
"""``moe_fn(p, x, moe, activation) -> (y, aux)``: an MoE feed-forward, as `moe_feed_forward`."""


def reordered_norm_block(
    p: Mapping[str, Any],
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: Any,
    cfg: ModelConfig,
    attention_fn: AttentionFn = attention,
    moe_fn: MoeFn = moe_feed_forward,
) -> torch.Tensor:
    """OLMo 2 block: ``h = x + norm(attn(x)); out = h + norm(mlp(h))``, mlp the gated MLP of
    ``cfg.mlp_activation``.

    p: one ``blocks.{i}`` subtree. x: (batch, seq, d_model) -> same shape and dtype.
    attention_fn computes ``attn`` (default `attention`; generation passes a KV-cached one); moe_fn
    an MoE feed-forward (default `moe_feed_forward`; expert parallelism passes its own).
    """
    h = x + rms_norm(attention_fn(p["attention"], x, rope, mask, cfg), p["attention_norm"], cfg.norm_eps)
    mlp, aux = feed_forward(p["feed_forward"], h, cfg, moe_fn)
    return with_aux(h + rms_norm(mlp, p["feed_forward_norm"], cfg.norm_eps), aux)


def pre_norm_block(
    p: Mapping[str, Any],
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: Any,
    cfg: ModelConfig,
    attention_fn: AttentionFn = attention,
    moe_fn: MoeFn = moe_feed_forward,
) -> torch.Tensor:
    """Llama block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``.

    Uses the same parameter names as the reordered-norm block: ``attention_norm`` is applied before
    attention and ``feed_forward_norm`` before the MLP. attention_fn and moe_fn as for
    `reordered_norm_block`.
    """
    h = x + attention_fn(p["attention"], rms_norm(x, p["attention_norm"], cfg.norm_eps), rope, mask, cfg)
    normed = rms_norm(h, p["feed_forward_norm"], cfg.norm_eps)
    mlp, aux = feed_forward(p["feed_forward"], normed, cfg, moe_fn)
    return with_aux(h + mlp, aux)


def feed_forward(
    p: Mapping[str, Any], x: torch.Tensor, cfg: ModelConfig, moe_fn: MoeFn = moe_feed_forward
) -> tuple[torch.Tensor, MoeAux | None]:
    """The gated MLP, or `moe_fn` when `p` has a router: (output, its `MoeAux` or None)."""
    if "router" in p:
        return moe_fn(p, x, cfg.moe, cfg.mlp_activation)
    return gated_mlp(p, x, cfg.mlp_activation), None


def with_aux(x: torch.Tensor, aux: MoeAux | None):
    return x if aux is None else (x, aux)


def block_output(out) -> tuple[torch.Tensor, MoeAux | None]:
    """``(x, aux)`` of what a block returned: x alone (aux None), or the pair an MoE block returns."""
    return (out, None) if isinstance(out, torch.Tensor) else out


BLOCKS = {"reordered_norm": reordered_norm_block, "pre_norm": pre_norm_block}


def block_for(cfg: ModelConfig):
    """The block function `cfg.block` names."""
    return BLOCKS[cfg.block]
