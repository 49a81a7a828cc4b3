"""The decoder as a pure function: token ids and a parameter tree in, logits or losses out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F

from olmo_fn.graph.block import block_for, block_output
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.loss import IGNORE_INDEX, cross_entropy_sums, linear_cross_entropy_sums
from olmo_fn.graph.masks import document_block_mask, document_causal_mask
from olmo_fn.graph.norms import rms_norm
from olmo_fn.graph.rope import rope_tables

AttentionBackend = Literal["auto", "sdpa", "flex"]
LayerInputs = tuple[tuple[torch.Tensor, torch.Tensor], dict[int, Any]]
"""What every block takes besides its parameters and x: the RoPE tables (cos, sin), and each
layer's mask by layer index."""
BlockFn = Callable[
    [Mapping[str, Any], torch.Tensor, tuple[torch.Tensor, torch.Tensor], Any, ModelConfig], torch.Tensor
]


def attention_mask(doc_ids: torch.Tensor | None, backend: AttentionBackend, window: int = 0) -> Any:
    """The mask object `attend` takes: None (plain causal) without document ids, else a document mask,
    within a sliding `window` if it is not 0.

    backend "auto" picks FlexAttention on CUDA and SDPA with a dense boolean mask elsewhere.
    """
    if doc_ids is None:
        return None
    if backend == "auto":
        backend = "flex" if doc_ids.is_cuda else "sdpa"
    if backend == "flex":
        return document_block_mask(doc_ids, window=window)
    return document_causal_mask(doc_ids, window=window)


def hidden_states(
    params: Mapping[str, Any],
    input_ids: torch.Tensor,
    cfg: ModelConfig,
    *,
    positions: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    backend: AttentionBackend = "auto",
    block_fn: BlockFn | None = None,
    inputs: LayerInputs | None = None,
    with_aux: bool = False,
):
    """Embedding and every block present in ``params["blocks"]``, in layer order.

    input_ids: (batch, seq) int. positions: (batch, seq) int RoPE positions, default ``0..seq-1``
    (pass per-document positions to restart RoPE at each document). doc_ids: (batch, seq) int,
    non-decreasing; with them attention is causal within documents, without them plainly causal.
    Layers with a sliding window (``cfg.layer_window``) also see only that many recent tokens.
    block_fn: defaults to the block ``cfg.block`` names (pass a compiled one to compile).
    inputs: the blocks' RoPE tables and masks when made elsewhere (a context-parallel slice's), instead
    of from positions and doc_ids.
    Returns (batch, seq, d_model) in the parameters' dtype, before the final norm; with `with_aux`,
    also the MoE layers' auxiliary sums, ``{layer: MoeAux}`` (empty for a dense model).
    """
    block_fn = block_fn or block_for(cfg)
    blocks = params["blocks"]
    layers = sorted(blocks.keys(), key=int)
    if inputs is None:
        inputs = layer_inputs(input_ids, cfg, [int(key) for key in layers], positions, doc_ids, backend)
    rope, masks = inputs
    x = F.embedding(input_ids, params["embeddings"])
    aux = {}
    for key in layers:
        x, layer_aux = block_output(block_fn(blocks[key], x, rope, masks[int(key)], cfg))
        if layer_aux is not None:
            aux[int(key)] = layer_aux
    return (x, aux) if with_aux else x


def layer_inputs(
    input_ids: torch.Tensor,
    cfg: ModelConfig,
    layers: list[int],
    positions: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    backend: AttentionBackend = "auto",
) -> LayerInputs:
    """What every block takes besides its parameters and x: the RoPE tables, and each layer's mask.

    Arguments as for `hidden_states`; returns ``((cos, sin), {layer: mask})``, one mask object per
    distinct window shared by the layers that use it.
    """
    if positions is None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    rope = rope_tables(positions, cfg.d_head, cfg.rope_theta, cfg.rope_scaling)
    windows = {layer: cfg.layer_window(layer) for layer in layers}
    # Sliding windows need a mask even without document ids: then each row is one document.
    window_ids = doc_ids if doc_ids is not None or not any(windows.values()) else torch.zeros_like(input_ids)
    by_window = {w: attention_mask(window_ids if w else doc_ids, backend, w) for w in set(windows.values())}
    return rope, {layer: by_window[w] for layer, w in windows.items()}


def lm_head(p: Mapping[str, torch.Tensor], h: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Final RMSNorm and output projection: (batch, seq, d_model) -> logits (batch, seq, vocab_size).

    p: ``{"norm", "w_out"}``; `head_params` gives it for tied and untied models alike."""
    return rms_norm(h, p["norm"], cfg.norm_eps) @ p["w_out"].T


def head_params(params: Mapping[str, Any], cfg: ModelConfig) -> Mapping[str, torch.Tensor]:
    """The LM head's norm and output matrix; with tied embeddings the matrix is ``params["embeddings"]``."""
    if cfg.tie_embeddings:
        return {"norm": params["lm_head"]["norm"], "w_out": params["embeddings"]}
    return params["lm_head"]


def logits(params: Mapping[str, Any], input_ids: torch.Tensor, cfg: ModelConfig, **kwargs) -> torch.Tensor:
    """Logits (batch, seq, vocab_size); keyword arguments as for `hidden_states`."""
    return lm_head(head_params(params, cfg), hidden_states(params, input_ids, cfg, **kwargs), cfg)


def loss_sums(
    params: Mapping[str, Any],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    cfg: ModelConfig,
    ignore_index: int = IGNORE_INDEX,
    loss_chunk_tokens: int | None = None,
    with_aux: bool = False,
    **kwargs,
):
    """``(ce_sum, z_sum, n_targets)`` of `cross_entropy_sums` for the model's logits on one batch;
    with `with_aux`, a fourth item: the MoE layers' auxiliary sums ``{layer: MoeAux}`` (see
    `olmo_fn.graph.moe`), which the objective weighs in (`moe_objective_sum`).

    loss_chunk_tokens: make the logits and their gradient that many positions at a time
    (`linear_cross_entropy_sums`) instead of all at once; None: all at once. Other keyword arguments as
    for `hidden_states`.
    """
    head = head_params(params, cfg)
    x, aux = hidden_states(params, input_ids, cfg, with_aux=True, **kwargs)
    h = rms_norm(x, head["norm"], cfg.norm_eps)
    if loss_chunk_tokens is None:
        sums = cross_entropy_sums(h @ head["w_out"].T, labels, ignore_index)
    else:
        sums = linear_cross_entropy_sums(h, head["w_out"], labels, loss_chunk_tokens, ignore_index)
    return (*sums, aux) if with_aux else sums
