"""Parameter counts and training FLOPs per token (for MFU)."""

from __future__ import annotations

import math

from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import param_shapes


def count_params(cfg: ModelConfig, *, embeddings: bool = True) -> int:
    """Number of parameters; without the embedding table when `embeddings` is False."""
    return sum(
        math.prod(shape) for path, shape in param_shapes(cfg).items() if embeddings or path != "embeddings"
    )


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul for every token: every matrix but the embedding table
    (which counts once when it is also the LM head's output matrix); of an MoE layer's stacked
    experts, only the top_k a token is sent to (the router counts whole)."""
    tied = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    total = tied
    for path, shape in param_shapes(cfg).items():
        if len(shape) == 2 and path != "embeddings":
            total += math.prod(shape)
        elif len(shape) == 3:  # experts (n_experts, out, in)
            total += cfg.moe.top_k * math.prod(shape[1:])
    return total


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses: all of a dense model; an MoE model's experts counted top_k of
    n_experts (OLMoE-1B-7B: about 1.3 B of 6.9 B)."""
    total = 0
    for shape in param_shapes(cfg).values():
        total += cfg.moe.top_k * math.prod(shape[1:]) if len(shape) == 3 else math.prod(shape)
    return total


def params_text(cfg: ModelConfig) -> str:
    """``"0.95M params"``; for an MoE model also what one token uses, e.g. ``"2.73M params (0.96M
    active: 8 experts of 192, 2 per token)"``."""
    text = f"{count_params(cfg) / 1e6:,.2f}M params"
    if cfg.moe.enabled:
        moe = cfg.moe
        text += (
            f" ({active_params(cfg) / 1e6:,.2f}M active: {moe.n_experts} experts of {moe.hidden}, "
            f"{moe.top_k} per token)"
        )
    return text


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * matmul_params + 12 * n_layers * n_heads * d_head * seq_len``.

    The attention term counts the full (not causally halved) score and value matmuls, forward and
    backward; OLMo-core reports its MFU with the same formula, so the numbers compare.
    """
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.d_head * seq_len
