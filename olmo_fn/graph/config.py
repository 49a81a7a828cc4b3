"""`ModelConfig`: the frozen description of a decoder (OLMo 2, OLMo 3, Llama-style, OLMoE)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from olmo_fn.errors import ConfigError
from olmo_fn.graph.moe_config import MoeConfig, moe_config_problems
from olmo_fn.graph.rope import RopeScaling, rope_scaling_problems


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and constants of a decoder: SwiGLU MLP, RoPE, RMSNorm; OLMo 2/3 or Llama-style blocks."""

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
    """RMSNorm of the q and k projections (OLMo 2, Qwen3); its scope says over what."""
    qk_norm_scope: Literal["all_heads", "per_head"] = "all_heads"
    """all_heads (OLMo 2): one RMSNorm over the whole projection before splitting heads, weights
    (n_heads * d_head,); per_head (Qwen3): each head normed on its own, weights (d_head,) shared by all
    heads."""
    mlp_activation: Literal["silu", "gelu", "gelu_tanh"] = "silu"
    """The gate of the gated MLP: silu (SwiGLU), gelu (GeGLU, exact erf) or gelu_tanh (GeGLU with the
    tanh approximation, as in Gemma)."""
    rope_scaling: RopeScaling = RopeScaling()
    """Context extension of RoPE: none, linear (position interpolation), llama3 or yarn."""
    init_std: float = 0.02
    """Standard deviation of the normal init of every matrix."""
    block: Literal["reordered_norm", "pre_norm"] = "reordered_norm"
    """reordered_norm (OLMo 2/3): h = x + norm(attn(x)); pre_norm (Llama): h = x + attn(norm(x))."""
    window_pattern: tuple[int, ...] = ()
    """Sliding-window sizes repeated over the layers, 0 = full attention; a query sees itself and the
    window-1 tokens before it. Empty: every layer full. OLMo 3: 4096 4096 4096 0."""
    full_last_layer: bool = True
    """With a window pattern, the last layer always attends fully (OLMo 3)."""
    tie_embeddings: bool = False
    """The LM head's output matrix is the embedding matrix (no separate lm_head.w_out), as in Llama 3.2 1B."""
    moe: MoeConfig = MoeConfig()
    """Mixture of experts in the feed-forward of some or all layers (OLMoE); off by default."""

    def __post_init__(self) -> None:
        problems = validate_model_config(self)
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def layer_window(self, layer: int) -> int:
        """The sliding window of `layer`, 0 for full attention."""
        if not self.window_pattern or (self.full_last_layer and layer == self.n_layers - 1):
            return 0
        return self.window_pattern[layer % len(self.window_pattern)]

    @property
    def layer_windows(self) -> tuple[int, ...]:
        return tuple(self.layer_window(i) for i in range(self.n_layers))


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
    for name in ("rope_theta", "norm_eps", "init_std"):
        value = getattr(cfg, name)
        if not 0 < value < math.inf:
            problems.append(f"model.{name}={value!r} must be finite and > 0")
    if cfg.block not in ("reordered_norm", "pre_norm"):
        problems.append(f"model.block={cfg.block!r} must be reordered_norm or pre_norm")
    if cfg.qk_norm_scope not in ("all_heads", "per_head"):
        problems.append(f"model.qk_norm_scope={cfg.qk_norm_scope!r} must be all_heads or per_head")
    if cfg.mlp_activation not in ("silu", "gelu", "gelu_tanh"):
        problems.append(f"model.mlp_activation={cfg.mlp_activation!r} must be silu, gelu or gelu_tanh")
    if isinstance(cfg.rope_scaling, RopeScaling):
        problems += rope_scaling_problems(cfg.rope_scaling)
    else:
        problems.append(f"model.rope_scaling={cfg.rope_scaling!r} must be a RopeScaling")
    problems += moe_config_problems(cfg.moe)
    bad_windows = [w for w in cfg.window_pattern if not isinstance(w, int) or isinstance(w, bool) or w < 0]
    if bad_windows:
        problems.append(f"model.window_pattern={cfg.window_pattern!r} must hold integers >= 0 (0 = full)")
    return problems


def matrix_dims(cfg: ModelConfig) -> tuple[int, ...]:
    """Every dimension of a block's matrices: d_model, the q and kv projection widths, mlp_hidden."""
    return (cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head, cfg.mlp_hidden)
