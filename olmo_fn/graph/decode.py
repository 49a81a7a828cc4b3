"""Incremental decoding with a key/value cache: prefill a batch of prompts, then one token at a time.

The cache is an explicit value (`KVCache`), threaded through the calls:
``logits, cache = prefill(params, cfg, prompts, capacity)``, then
``logits, cache = decode_step(params, cfg, cache, next_tokens)``. Every call writes the new keys and
values into the cache's preallocated buffers in place and returns a record with the new length, so
**the input cache is consumed**: keep using only the returned one (like the train step reusing buffers).

Prompts of different lengths are **left-padded** to the longest, so the last slot of every row is its
newest token and one decode step serves the whole batch. Row ``b`` has ``pad[b]`` padding slots in
front; its token in slot ``s`` has RoPE position ``s - pad[b]`` (so a row computes exactly what it
would alone), and no query attends to a padding key. Padding queries attend only to themselves,
which keeps every softmax row finite; their outputs are never read.

The blocks are the training blocks (`block_for`), with `cached_attention` injected as their
attention. Sliding windows (`cfg.layer_window`) apply to cached keys too. Windowed layers keep every
slot in their buffers (no ring buffer), so the cache costs the same for every layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from olmo_fn.graph.attention import attend, project_out, project_qkv
from olmo_fn.graph.block import block_for, block_output
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.model import head_params, lm_head
from olmo_fn.graph.rope import rope_tables


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for the tokens seen so far, in preallocated buffers.

    Slots ``0..length-1`` of each buffer are filled, the same count for every row (padding included).
    """

    keys: tuple[torch.Tensor, ...]
    """Per layer, (batch, n_kv_heads, capacity, d_head) in the parameters' dtype, RoPE applied."""
    values: tuple[torch.Tensor, ...]
    """Per layer, (batch, n_kv_heads, capacity, d_head)."""
    pad: torch.Tensor
    """(batch,) int64: the left-padding slots in front of each row's first token."""
    length: int
    """Slots filled so far."""

    @property
    def capacity(self) -> int:
        """Slots each buffer holds."""
        return self.keys[0].shape[2]


def empty_cache(
    cfg: ModelConfig, pad: torch.Tensor, capacity: int, *, dtype: torch.dtype = torch.float32
) -> KVCache:
    """A cache with room for `capacity` slots per row, for rows left-padded by `pad` (batch,) int64."""
    shape = (pad.shape[0], cfg.n_kv_heads, capacity, cfg.d_head)

    def buffers() -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(shape, dtype=dtype, device=pad.device) for _ in range(cfg.n_layers))

    return KVCache(keys=buffers(), values=buffers(), pad=pad, length=0)


def left_pad(
    prompts: Sequence[Sequence[int]], *, device: str | torch.device = "cpu", pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (batch, longest) int64 with each prompt right-aligned, pad (batch,) int64 padding counts).

    Padding slots hold `pad_id` (any valid token id: they are masked out).
    """
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.int64)
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.int64)
    return ids.to(device), pad.to(device)


def slot_positions(pad: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """RoPE positions (batch, n) int64 of slots ``start..start+n-1``: slot minus padding, 0 on padding."""
    slots = torch.arange(start, start + n, device=pad.device)
    return (slots[None, :] - pad[:, None]).clamp(min=0)


def cache_mask(pad: torch.Tensor, start: int, n: int, window: int = 0) -> torch.Tensor:
    """Which cached keys the queries in slots ``start..start+n-1`` see: bool (batch, 1, n, start + n).

    A query sees the non-padding keys at or before its slot, within `window` slots (0 = all); a padding
    query sees only itself.
    """
    query = torch.arange(start, start + n, device=pad.device)[:, None]
    key = torch.arange(start + n, device=pad.device)[None, :]
    visible = key <= query
    if window:
        visible = visible & (query - key < window)
    real_key = key[None] >= pad[:, None, None]
    return ((visible[None] & real_key) | (key == query)[None])[:, None]


def cached_attention(
    p: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    cfg: ModelConfig,
    *,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
) -> torch.Tensor:
    """`attention` for new tokens in slots ``start..start+seq-1`` over every cached slot before them.

    Writes the new keys and values into `keys` / `values` (batch, n_kv_heads, capacity, d_head) in
    place, then attends over slots ``0..start+seq-1``. x: (batch, seq, d_model); mask: bool
    (batch, 1, seq, start + seq) from `cache_mask`. Returns (batch, seq, d_model). Bind the keyword
    arguments (``functools.partial``) to get an `AttentionFn` for the blocks.
    """
    q, k, v = project_qkv(p, x, rope, cfg)
    end = start + x.shape[1]
    keys[:, :, start:end] = k
    values[:, :, start:end] = v
    return project_out(p, attend(q, keys[:, :, :end], values[:, :, :end], mask))


def cached_hidden_states(
    params: Mapping[str, Any], cfg: ModelConfig, cache: KVCache, tokens: torch.Tensor
) -> tuple[torch.Tensor, KVCache]:
    """Run `tokens` (batch, n) int64, the next n slots of every row, through the model over the cache.

    Returns the hidden states (batch, n, d_model) before the final norm, and the cache holding the new
    slots too (`cache` is consumed: its buffers are written in place).
    """
    start, n = cache.length, tokens.shape[1]
    if start + n > cache.capacity:
        raise ValueError(f"KV cache full: {start} + {n} slots exceed its capacity of {cache.capacity}")
    rope = rope_tables(slot_positions(cache.pad, start, n), cfg.d_head, cfg.rope_theta, cfg.rope_scaling)
    windows = cfg.layer_windows
    masks = {w: cache_mask(cache.pad, start, n, w) for w in set(windows)}
    block_fn = block_for(cfg)
    x = F.embedding(tokens, params["embeddings"])
    for layer in range(cfg.n_layers):
        attention_fn = functools.partial(
            cached_attention, keys=cache.keys[layer], values=cache.values[layer], start=start
        )
        x, _ = block_output(
            block_fn(params["blocks"][str(layer)], x, rope, masks[windows[layer]], cfg, attention_fn)
        )
    return x, dataclasses.replace(cache, length=start + n)


def prefill(
    params: Mapping[str, Any],
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    capacity: int,
) -> tuple[torch.Tensor, KVCache]:
    """Run non-empty `prompts` (token id lists, any lengths) through the model.

    `capacity`: slots per row, at least the longest prompt; each later `decode_step` takes one more.
    Returns the logits of each prompt's last token (batch, vocab_size) and the cache.
    """
    if not prompts or not all(prompts):
        raise ValueError("prefill needs at least one prompt, and no prompt may be empty")
    embeddings = params["embeddings"]
    ids, pad = left_pad(prompts, device=embeddings.device)
    if capacity < ids.shape[1]:
        raise ValueError(f"capacity={capacity} is smaller than the longest prompt ({ids.shape[1]} tokens)")
    cache = empty_cache(cfg, pad, capacity, dtype=embeddings.dtype)
    hidden, cache = cached_hidden_states(params, cfg, cache, ids)
    return lm_head(head_params(params, cfg), hidden[:, -1:], cfg)[:, 0], cache


def decode_step(
    params: Mapping[str, Any], cfg: ModelConfig, cache: KVCache, tokens: torch.Tensor
) -> tuple[torch.Tensor, KVCache]:
    """Feed one token per row, tokens: (batch,) int64; returns its logits (batch, vocab_size) and the
    cache (`cache` is consumed)."""
    hidden, cache = cached_hidden_states(params, cfg, cache, tokens[:, None])
    return lm_head(head_params(params, cfg), hidden, cfg)[:, 0], cache
