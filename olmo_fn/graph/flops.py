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
    (which counts once when it is also the LM head's output matrix)."""
    tied = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    return tied + sum(math.prod(s) for p, s in param_shapes(cfg).items() if len(s) == 2 and p != "embeddings")


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * matmul_params + 12 * n_layers * n_heads * d_head * seq_len``.

    The attention term counts the full (not causally halved) score and value matmuls, forward and
    backward; OLMo-core reports its MFU with the same formula, so the numbers compare.
    """
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.d_head * seq_len
