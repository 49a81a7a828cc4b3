"""Hugging Face transformers <-> olmo_fn names and configs for OLMo 2 (``Olmo2ForCausalLM``).

The one place the weight-name mapping lives; import/export and the logit-parity tests use it.
Both sides store matrices ``(out, in)``, so tensors move across unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict

from olmo_fn.errors import CheckpointError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import flatten, unflatten

# (olmo_fn path pattern, Hugging Face name pattern); {i} is the layer number.
_OLMO2_NAMES = [
    ("embeddings", "model.embed_tokens.weight"),
    ("blocks.{i}.attention.w_q", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blocks.{i}.attention.w_k", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blocks.{i}.attention.w_v", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blocks.{i}.attention.w_out", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blocks.{i}.attention.q_norm", "model.layers.{i}.self_attn.q_norm.weight"),
    ("blocks.{i}.attention.k_norm", "model.layers.{i}.self_attn.k_norm.weight"),
    ("blocks.{i}.attention_norm", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.feed_forward.w1", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blocks.{i}.feed_forward.w3", "model.layers.{i}.mlp.up_proj.weight"),
    ("blocks.{i}.feed_forward.w2", "model.layers.{i}.mlp.down_proj.weight"),
    ("blocks.{i}.feed_forward_norm", "model.layers.{i}.post_feedforward_layernorm.weight"),
    ("lm_head.norm", "model.norm.weight"),
    ("lm_head.w_out", "lm_head.weight"),
]


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_TO_HF = [(_compile(ours), theirs) for ours, theirs in _OLMO2_NAMES]
_FROM_HF = [(_compile(theirs), ours) for ours, theirs in _OLMO2_NAMES]


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.match(name)
        if match:
            return target.format(**match.groupdict())
    return None


def olmo2_to_hf_name(path: str) -> str:
    """Hugging Face name of the parameter at dotted olmo_fn `path`."""
    name = _rename(path, _TO_HF)
    if name is None:
        raise CheckpointError(f"parameter {path!r} has no Hugging Face OLMo 2 counterpart")
    return name


def hf_to_olmo2_path(name: str) -> str:
    """Dotted olmo_fn path of the Hugging Face OLMo 2 parameter `name`."""
    path = _rename(name, _FROM_HF)
    if path is None:
        raise CheckpointError(f"Hugging Face tensor {name!r} is not part of an OLMo 2 model")
    return path


def params_to_hf_olmo2(params: TensorDict | Mapping) -> dict[str, torch.Tensor]:
    """A transformers ``Olmo2ForCausalLM`` state dict holding `params`' tensors."""
    return {olmo2_to_hf_name(path): t for path, t in flatten(params).items()}


def hf_olmo2_to_params(state_dict: Mapping[str, torch.Tensor]) -> TensorDict:
    """The parameter tree held by a transformers ``Olmo2ForCausalLM`` state dict."""
    return unflatten({hf_to_olmo2_path(name): t for name, t in state_dict.items()})


def hf_olmo2_config(cfg: ModelConfig, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``transformers.Olmo2Config`` describing the same model as `cfg`."""
    if not cfg.qk_norm:
        raise CheckpointError(
            "Hugging Face Olmo2 always applies QK-norm; model.qk_norm=False has no equivalent"
        )
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        initializer_range=cfg.init_std,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    kwargs.update(overrides)
    return kwargs
