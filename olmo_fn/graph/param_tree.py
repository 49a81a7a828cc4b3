"""The parameter tree: its paths and shapes, and conversions between nested and dotted forms.

Paths follow OLMo-core's names (without its ``.weight`` suffix) so checkpoints and the Hugging Face
mapping translate key by key::

    embeddings                                  (vocab_size, d_model)
    blocks.{i}.attention.w_q                    (n_heads * d_head, d_model)
    blocks.{i}.attention.w_k / w_v              (n_kv_heads * d_head, d_model)
    blocks.{i}.attention.w_out                  (d_model, n_heads * d_head)
    blocks.{i}.attention.q_norm                 (n_heads * d_head,)      [qk_norm; (d_head,) per head]
    blocks.{i}.attention.k_norm                 (n_kv_heads * d_head,)   [qk_norm; (d_head,) per head]
    blocks.{i}.attention_norm                   (d_model,)
    blocks.{i}.feed_forward.w1 / w3             (mlp_hidden, d_model)    gate / up
    blocks.{i}.feed_forward.w2                  (d_model, mlp_hidden)    down
    blocks.{i}.feed_forward.router              (n_experts, d_model)     [MoE layers, instead of w1/w2/w3]
    blocks.{i}.feed_forward.experts.w1 / w3     (n_experts, hidden, d_model)
    blocks.{i}.feed_forward.experts.w2          (n_experts, d_model, hidden)
    blocks.{i}.feed_forward.expert_bias         (n_experts,)   [MoE, bias_rate > 0; zeros at init]
    blocks.{i}.feed_forward.shared.w1/w2/w3     as w1/w2/w3 with shared_hidden   [MoE, shared_hidden > 0]
    blocks.{i}.feed_forward_norm                (d_model,)
    lm_head.norm                                (d_model,)
    lm_head.w_out                               (vocab_size, d_model)  [not with tie_embeddings]

Matrices are stored ``(out, in)`` like ``torch.nn.Linear`` weights. Each layer is its own subtree
(no stacked layer axis), so pipeline stages are slices of ``blocks`` and every layer reuses one
compiled block graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict

from olmo_fn.graph.config import ModelConfig


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every parameter, in a fixed order."""
    d, h = cfg.d_model, cfg.d_head
    q_dim, kv_dim = cfg.n_heads * h, cfg.n_kv_heads * h
    shapes: dict[str, tuple[int, ...]] = {"embeddings": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        shapes[f"{b}.attention.w_q"] = (q_dim, d)
        shapes[f"{b}.attention.w_k"] = (kv_dim, d)
        shapes[f"{b}.attention.w_v"] = (kv_dim, d)
        shapes[f"{b}.attention.w_out"] = (d, q_dim)
        if cfg.qk_norm:
            per_head = cfg.qk_norm_scope == "per_head"
            shapes[f"{b}.attention.q_norm"] = (h,) if per_head else (q_dim,)
            shapes[f"{b}.attention.k_norm"] = (h,) if per_head else (kv_dim,)
        shapes[f"{b}.attention_norm"] = (d,)
        if cfg.moe.is_moe_layer(i):
            shapes.update(moe_shapes(cfg, f"{b}.feed_forward"))
        else:
            shapes.update(mlp_shapes(d, cfg.mlp_hidden, f"{b}.feed_forward"))
        shapes[f"{b}.feed_forward_norm"] = (d,)
    shapes["lm_head.norm"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.w_out"] = (cfg.vocab_size, d)
    return shapes


def mlp_shapes(d_model: int, hidden: int, prefix: str) -> dict[str, tuple[int, ...]]:
    """The gated MLP's three matrices under `prefix`."""
    dot = f"{prefix}." if prefix else ""
    return {f"{dot}w1": (hidden, d_model), f"{dot}w2": (d_model, hidden), f"{dot}w3": (hidden, d_model)}


def moe_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """An MoE feed-forward's router, stacked experts and shared expert under `prefix`."""
    n, d, h = cfg.moe.n_experts, cfg.d_model, cfg.moe.hidden
    shapes = {f"{prefix}.router": (n, d)}
    if cfg.moe.bias_rate:
        shapes[f"{prefix}.expert_bias"] = (n,)
    shapes.update({f"{prefix}.experts.{w}": (n, *shape) for w, shape in mlp_shapes(d, h, "").items()})
    if cfg.moe.shared_hidden:
        shapes.update(mlp_shapes(d, cfg.moe.shared_hidden, f"{prefix}.shared"))
    return shapes


def flatten(tree: TensorDict | Mapping) -> dict[str, torch.Tensor]:
    """Nested tree -> ``{dotted path: tensor}``."""
    if isinstance(tree, TensorDict):
        return dict(tree.flatten_keys(".").items())
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping | TensorDict):
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[key] = value
    return out


def unflatten(flat: Mapping[str, torch.Tensor]) -> TensorDict:
    """``{dotted path: tensor}`` -> nested TensorDict (no batch dimensions)."""
    return TensorDict(unflatten_dicts(flat), batch_size=[])


def unflatten_dicts(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{dotted path: value}`` -> nested plain dicts (which the compiler traces without a TensorDict
    round trip)."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        node = nested
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
