"""`ModelConfig`: the frozen description of an OLMo 2 style decoder."""

from __future__ import annotations

import dataclasses

from olmo_fn.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and constants of an OLMo 2 decoder (reordered-norm blocks, QK-norm, SwiGLU, RoPE)."""

    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads per attention layer; must divide d_model."""
    n_kv_heads: int = 4
    """Key/value heads (grouped-query attention when fewer than n_heads); must divide n_heads."""
    mlp_hidden: int = 384
    """Hidden width of the SwiGLU feed-forward layer."""
    vocab_size: int = 384
    """Rows of the embedding and of the LM head (the tokenizer's vocab, usually padded up)."""
    rope_theta: float = 500_000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qk_norm: bool = True
    """RMSNorm over the whole q and k projections before splitting heads (OLMo 2)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of every matrix."""

    def __post_init__(self) -> None:
        problems = validate_model_config(self)
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


def validate_model_config(cfg: ModelConfig) -> list[str]:
    """Every reason `cfg` cannot build a model, each naming the field and value."""
    problems = []
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "vocab_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"model.{name}={value!r} must be a positive integer")
    if problems:
        return problems
    if cfg.d_model % cfg.n_heads:
        problems.append(f"model.n_heads={cfg.n_heads} does not divide model.d_model={cfg.d_model}")
    elif (cfg.d_model // cfg.n_heads) % 2:
        problems.append(
            f"head size model.d_model/model.n_heads={cfg.d_model // cfg.n_heads} must be even for RoPE"
        )
    if cfg.n_heads % cfg.n_kv_heads:
        problems.append(f"model.n_kv_heads={cfg.n_kv_heads} does not divide model.n_heads={cfg.n_heads}")
    if not cfg.rope_theta > 0:
        problems.append(f"model.rope_theta={cfg.rope_theta!r} must be > 0")
    if not cfg.norm_eps > 0:
        problems.append(f"model.norm_eps={cfg.norm_eps!r} must be > 0")
    if not cfg.init_std > 0:
        problems.append(f"model.init_std={cfg.init_std!r} must be > 0")
    return problems
