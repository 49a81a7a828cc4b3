"""Named model sizes: every OLMo 2 size, OLMo 3 from 14M to 32B, Llama 3 8B, OLMoE 1B-7B, and tiny
dense and MoE models for a laptop CPU."""

from __future__ import annotations

import dataclasses

from olmo_fn.errors import ConfigError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.moe_config import MoeConfig

DOLMA2_VOCAB = 100_352
"""The dolma2 tokenizer's 100,278 entries padded to a multiple of 128."""


def _olmo2(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, mlp_hidden: int) -> ModelConfig:
    return ModelConfig(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        mlp_hidden=mlp_hidden,
        vocab_size=DOLMA2_VOCAB,
    )


OLMO3_WINDOWS = (4096, 4096, 4096, 0)
"""OLMo 3's attention pattern: three sliding-window layers, then one full (the last layer full)."""


PRESETS: dict[str, ModelConfig] = {
    # 1.0 M params; the byte-level vocab (256 bytes + EOS + PAD) padded to 384.
    "olmo2-tiny": ModelConfig(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden=384, vocab_size=384
    ),
    "olmo2-14m": _olmo2(128, 4, 8, 8, 512),
    "olmo2-30m": _olmo2(256, 4, 8, 8, 768),
    "olmo2-60m": _olmo2(384, 8, 8, 8, 1536),
    "olmo2-100m": _olmo2(512, 12, 8, 8, 2048),
    "olmo2-190m": _olmo2(768, 12, 12, 12, 3072),
    "olmo2-370m": _olmo2(1024, 16, 16, 16, 4096),
    "olmo2-600m": _olmo2(1344, 16, 16, 16, 5376),
    "olmo2-760m": _olmo2(1536, 16, 16, 16, 6144),
    "olmo2-1b": _olmo2(2048, 18, 16, 16, 8192),
    "olmo2-3b": _olmo2(3328, 16, 16, 16, 13312),
    "olmo2-7b": _olmo2(4096, 32, 32, 32, 11008),
    "olmo2-13b": _olmo2(5120, 40, 40, 40, 13824),
    "olmo2-32b": _olmo2(5120, 64, 40, 8, 27648),
    # OLMo 3: the OLMo 2 shapes with the sliding-window pattern (last layer full).
    **{
        f"olmo3-{size}": dataclasses.replace(_olmo2(*shape), window_pattern=OLMO3_WINDOWS)
        for size, shape in {
            "14m": (128, 4, 8, 8, 512),
            "30m": (256, 4, 8, 8, 768),
            "60m": (384, 8, 8, 8, 1536),
            "100m": (512, 12, 8, 8, 2048),
            "190m": (768, 12, 12, 12, 3072),
            "370m": (1024, 16, 16, 16, 4096),
            "760m": (1536, 16, 16, 16, 6144),
            "7b": (4096, 32, 32, 32, 11008),
            "32b": (5120, 64, 40, 8, 27648),
        }.items()
    },
    # OLMoE-1B-7B-0924: Llama's pre-norm block with OLMo's QK-norm, 64 experts of width 1024, 8 per token.
    "olmoe-1b-7b": ModelConfig(
        d_model=2048,
        n_layers=16,
        n_heads=16,
        n_kv_heads=16,
        mlp_hidden=1024,
        vocab_size=50_304,
        rope_theta=10_000.0,
        norm_eps=1e-5,
        block="pre_norm",
        moe=MoeConfig(n_experts=64, top_k=8, hidden=1024, lb_loss=0.01, router_z_loss=0.001),
    ),
    # olmo2-tiny with 8 experts of width 192, 2 per token: the same active parameters as olmo2-tiny
    # (plus each layer's 8 x 128 router), 4x its feed-forward parameters in all; balanced by the
    # load-balancing loss and an expert bias (without it, an expert can go idle in a short run).
    "olmoe-tiny": ModelConfig(
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        mlp_hidden=384,
        vocab_size=384,
        moe=MoeConfig(n_experts=8, top_k=2, hidden=192, bias_rate=0.003),
    ),
    "llama3-8b": ModelConfig(
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        mlp_hidden=14336,
        vocab_size=128_256,
        norm_eps=1e-5,
        qk_norm=False,
        block="pre_norm",
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; a ConfigError listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
