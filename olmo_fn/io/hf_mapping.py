"""Hugging Face transformers <-> olmo_fn: parameter names and model configs.

Covers ``Olmo2ForCausalLM`` (``olmo2``), ``Olmo3ForCausalLM`` (``olmo3``) and ``LlamaForCausalLM``
(``llama``). The one place these mappings live: import, export and the logit-parity tests use them.
Both sides store matrices ``(out, in)``, so tensors move across unchanged. The norms are named by
what they do in olmo_fn (``attention_norm`` and ``feed_forward_norm`` in both block kinds) and by
where they sit in Hugging Face, so their names differ between OLMo and Llama.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
from tensordict import TensorDict

from olmo_fn.errors import CheckpointError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import flatten, unflatten

HfArch = Literal["olmo2", "olmo3", "llama"]
ARCHITECTURES: dict[str, str] = {
    "olmo2": "Olmo2ForCausalLM",
    "olmo3": "Olmo3ForCausalLM",
    "llama": "LlamaForCausalLM",
}

_COMMON = [
    ("embeddings", "model.embed_tokens.weight"),
    ("blocks.{i}.attention.w_q", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blocks.{i}.attention.w_k", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blocks.{i}.attention.w_v", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blocks.{i}.attention.w_out", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blocks.{i}.feed_forward.w1", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blocks.{i}.feed_forward.w3", "model.layers.{i}.mlp.up_proj.weight"),
    ("blocks.{i}.feed_forward.w2", "model.layers.{i}.mlp.down_proj.weight"),
    ("lm_head.norm", "model.norm.weight"),
    ("lm_head.w_out", "lm_head.weight"),
]
_OLMO_NORMS = [
    ("blocks.{i}.attention.q_norm", "model.layers.{i}.self_attn.q_norm.weight"),
    ("blocks.{i}.attention.k_norm", "model.layers.{i}.self_attn.k_norm.weight"),
    ("blocks.{i}.attention_norm", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.feed_forward_norm", "model.layers.{i}.post_feedforward_layernorm.weight"),
]
_LLAMA_NORMS = [
    ("blocks.{i}.attention_norm", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.feed_forward_norm", "model.layers.{i}.post_attention_layernorm.weight"),
]
_NAMES = {"olmo2": _COMMON + _OLMO_NORMS, "olmo3": _COMMON + _OLMO_NORMS, "llama": _COMMON + _LLAMA_NORMS}


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_RULES = {
    arch: ([(_compile(a), b) for a, b in names], [(_compile(b), a) for a, b in names])
    for arch, names in _NAMES.items()
}


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.match(name)
        if match:
            return target.format(**match.groupdict())
    return None


def to_hf_name(path: str, arch: HfArch) -> str:
    """Hugging Face name of the parameter at dotted olmo_fn `path`."""
    name = _rename(path, _RULES[arch][0])
    if name is None:
        raise CheckpointError(f"parameter {path!r} has no Hugging Face {arch} counterpart")
    return name


def from_hf_name(name: str, arch: HfArch) -> str:
    """Dotted olmo_fn path of the Hugging Face parameter `name`."""
    path = _rename(name, _RULES[arch][1])
    if path is None:
        raise CheckpointError(f"Hugging Face tensor {name!r} is not part of a {ARCHITECTURES[arch]} model")
    return path


def params_to_hf(params: TensorDict | Mapping, arch: HfArch) -> dict[str, torch.Tensor]:
    """A transformers state dict of architecture `arch` holding `params`' tensors."""
    return {to_hf_name(path, arch): t for path, t in flatten(params).items()}


def params_from_hf(state_dict: Mapping[str, torch.Tensor], arch: HfArch, *, tied: bool = False) -> TensorDict:
    """The parameter tree held by a transformers state dict. With `tied` embeddings there is no
    lm_head.w_out (a saved ``lm_head.weight``, the same matrix, is dropped)."""
    flat = {from_hf_name(name, arch): t for name, t in state_dict.items() if not _is_buffer(name)}
    if tied:
        flat.pop("lm_head.w_out", None)
    return unflatten(flat)


def _is_buffer(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")


def arch_for(cfg: ModelConfig) -> HfArch:
    """The Hugging Face architecture that computes what `cfg` does."""
    if cfg.block == "pre_norm":
        if cfg.qk_norm or cfg.window_pattern:
            raise CheckpointError(
                "a pre-norm model with QK-norm or sliding windows has no Hugging Face equivalent"
            )
        return "llama"
    if not cfg.qk_norm:
        raise CheckpointError(
            "Hugging Face OLMo always applies QK-norm; model.qk_norm=False has no equivalent"
        )
    return "olmo3" if any(cfg.layer_windows) else "olmo2"


def hf_config(cfg: ModelConfig, arch: HfArch | None = None, **extra: Any) -> dict[str, Any]:
    """A transformers ``config.json`` (as a dict) describing the same model as `cfg`."""
    arch = arch or arch_for(cfg)
    if arch != arch_for(cfg):
        raise CheckpointError(f"this model is a Hugging Face {arch_for(cfg)} model, not {arch}")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # read by transformers 4.x
        "rope_parameters": rope,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
    }
    if arch == "llama":
        config.update(mlp_bias=False, head_dim=cfg.d_head)
    if arch == "olmo3":
        sizes = {w for w in cfg.layer_windows if w}
        if len(sizes) != 1:
            raise CheckpointError(
                f"Hugging Face Olmo3 has one sliding-window size, this model has {sorted(sizes)}"
            )
        config["sliding_window"] = sizes.pop()
        config["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.layer_windows]
        config["rope_parameters"] = {"full_attention": rope, "sliding_attention": dict(rope)}
    config.update(extra)
    return config


def model_config_from_hf(config: Mapping[str, Any], where: str = "config.json") -> tuple[ModelConfig, HfArch]:
    """The ModelConfig of a transformers config, refusing (with the field named) what olmo_fn cannot
    compute exactly."""
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: model_type {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )

    def refuse_if(condition: bool, what: str) -> None:
        if condition:
            raise CheckpointError(f"{where}: {what} is not supported")

    _check_sizes(config, where)
    d_model, heads = config["hidden_size"], config["num_attention_heads"]
    refuse_if(config.get("hidden_act", "silu") != "silu", f"hidden_act={config.get('hidden_act')!r}")
    refuse_if(bool(config.get("attention_bias")), "attention_bias=true")
    refuse_if(bool(config.get("mlp_bias")), "mlp_bias=true")
    head_dim = config.get("head_dim")
    refuse_if(
        head_dim not in (None, d_model // heads), f"head_dim={head_dim} != hidden_size/num_attention_heads"
    )
    theta = _rope_theta(config, where)
    windows: tuple[int, ...] = ()
    if arch == "olmo3":
        layer_types = config.get("layer_types") or []
        window = config.get("sliding_window")
        windows = tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
        refuse_if(len(windows) != config["num_hidden_layers"], "layer_types of the wrong length")
    cfg = ModelConfig(
        d_model=d_model,
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        mlp_hidden=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        rope_theta=theta,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        qk_norm=arch != "llama",
        init_std=config.get("initializer_range", 0.02),
        block="pre_norm" if arch == "llama" else "reordered_norm",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        **_window_fields(windows),
    )
    return cfg, arch


_REQUIRED_SIZES = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


def _check_sizes(config: Mapping[str, Any], where: str) -> None:
    """Every size field present and a positive integer; every constant a finite positive number."""

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    missing = [name for name in _REQUIRED_SIZES if name not in config]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)} (required to build the model)")
    optional = [n for n in ("num_key_value_heads", "head_dim") if config.get(n) is not None]
    for name in (*_REQUIRED_SIZES, *optional):
        if not positive_int(config[name]):
            raise CheckpointError(f"{where}: {name}={config[name]!r} must be a positive integer")
    for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
        value = config.get(name)
        if value is not None and (
            not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf")
        ):
            raise CheckpointError(f"{where}: {name}={value!r} must be a finite positive number")


def _rope_theta(config: Mapping[str, Any], where: str) -> float:
    """The single default-RoPE theta of a config (transformers 4.x or 5.x layout)."""
    params = config.get("rope_parameters")
    if params is None:
        scaling = config.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise CheckpointError(f"{where}: rope_scaling {scaling} is not supported (only default RoPE)")
        return float(config.get("rope_theta", 10_000.0))
    per_type = list(params.values()) if all(isinstance(v, dict) for v in params.values()) else [params]
    kinds = {(p.get("rope_type", "default"), float(p.get("rope_theta", 10_000.0))) for p in per_type}
    if len(kinds) != 1 or next(iter(kinds))[0] != "default":
        raise CheckpointError(
            f"{where}: rope_parameters {dict(params)} are not supported (one default RoPE only)"
        )
    return next(iter(kinds))[1]


def _window_fields(windows: tuple[int, ...]) -> dict[str, Any]:
    """The shortest (window_pattern, full_last_layer) that reproduces per-layer `windows`."""
    if not any(windows):
        return {}
    n = len(windows)
    for full_last in (True, False):
        for length in range(1, n + 1):
            candidate = ModelConfig(n_layers=n, window_pattern=windows[:length], full_last_layer=full_last)
            if candidate.layer_windows == windows:
                return {"window_pattern": windows[:length], "full_last_layer": full_last}
    raise AssertionError("unreachable: the full list always reproduces itself")
