"""Choosing next tokens (greedy, temperature, top-k, top-p) and generating continuations of prompts.

`next_tokens` applies, in order: temperature (0 = greedy argmax, top-k/top-p then ignored), top-k on
the scaled logits, top-p on what top-k left, then draws from the softmax with the given
``torch.Generator``, so the same generator state gives the same tokens.

`generate_stream` yields the new token of every row step by step; `generate` collects them. A row
stops at its EOS (which is **not** included in its output), after `max_new_tokens` tokens, or when it
reaches `max_length` tokens, prompt included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from olmo_fn.errors import ConfigError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.decode import decode_step, prefill


def sampling_problems(temperature: float, top_k: int, top_p: float) -> list[str]:
    """Every reason these sampling settings are invalid, each naming the field and value."""
    problems = []
    if not temperature >= 0:
        problems.append(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        problems.append(f"top_k={top_k!r} must be an integer >= 0 (0 = no top-k)")
    if not 0 < top_p <= 1:
        problems.append(f"top_p={top_p!r} must be in (0, 1] (1 = no top-p)")
    return problems


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """`logits` (batch, vocab) with every entry but the k largest of each row set to -inf.

    Exactly k survive per row (ties broken by `torch.topk`); k = 0 or k >= vocab keeps all.
    """
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~kept, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """`logits` (batch, vocab) restricted to each row's nucleus: the smallest set of most likely tokens
    whose softmax probability sums to at least `p`; the rest set to -inf. p = 1 keeps all.

    A token is kept when the tokens more likely than it sum to less than p (probabilities in fp32),
    so the most likely token always survives.
    """
    if p >= 1:
        return logits
    probs, order = F.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True)
    mass_before = F.pad(probs.cumsum(-1)[..., :-1], (1, 0))
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, mass_before < p)
    return logits.masked_fill(~kept, float("-inf"))


def next_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of `logits` (batch, vocab): (batch,) int64.

    temperature 0 is greedy (argmax). Otherwise samples from ``softmax(logits / temperature)``
    restricted by `top_k_filter` then `top_p_filter`, in fp32, drawing with `generator` (on the
    logits' device; None: torch's global generator).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=generator)[:, 0]


def prompt_problems(prompts: Sequence[Sequence[int]], vocab_size: int, max_length: int | None) -> list[str]:
    """Every reason `prompts` cannot be continued: empty, out-of-vocabulary ids, or too long."""
    problems = [] if prompts else ["no prompts given"]
    for i, prompt in enumerate(prompts):
        if not prompt:
            problems.append(f"prompts[{i}] is empty")
        elif any(not 0 <= t < vocab_size for t in prompt):
            bad = next(t for t in prompt if not 0 <= t < vocab_size)
            problems.append(f"prompts[{i}] holds token id {bad}, outside the model's 0..{vocab_size - 1}")
        elif max_length is not None and len(prompt) >= max_length:
            problems.append(
                f"prompts[{i}] has {len(prompt)} tokens; max_length={max_length} leaves no room for a new one"
            )
    return problems


def new_token_budget(prompt_len: int, max_new_tokens: int, max_length: int | None) -> int:
    """How many tokens a row may generate: `max_new_tokens`, less if `max_length` (prompt included)
    comes first."""
    if max_length is None:
        return max_new_tokens
    return max(0, min(max_new_tokens, max_length - prompt_len))


def generate_stream(
    params: Mapping[str, Any],
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    max_length: int | None = None,
) -> Iterator[list[int | None]]:
    """Continue each prompt (a list of token ids) with the KV cache, yielding one list per step: the new
    token of every row, or None for a row that has stopped (it reached EOS, which is not yielded, or its
    token budget). Ends once every row has stopped.

    Sampling as for `next_tokens`. `max_length` caps prompt plus completion per row (None: no cap).
    Raises ConfigError at once (not at the first step) for invalid settings or prompts: empty, out of
    the vocabulary, or too long.
    """
    problems = sampling_problems(temperature, top_k, top_p)
    problems += prompt_problems(prompts, cfg.vocab_size, max_length)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        problems.append(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if problems:
        raise ConfigError("cannot generate: " + "; ".join(problems))
    budgets = [new_token_budget(len(p), max_new_tokens, max_length) for p in prompts]

    def choose(logits: torch.Tensor) -> torch.Tensor:
        return next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    return _decode_loop(params, cfg, prompts, budgets, eos_token_id, choose)


def _decode_loop(
    params: Mapping[str, Any],
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    budgets: list[int],
    eos_token_id: int | None,
    choose: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[list[int | None]]:
    """Prefill, then choose and feed back one token per step until every row's budget is spent."""
    if not any(budgets):
        return
    # The last token of the longest-running row is never fed back, hence the -1.
    capacity = max(len(p) for p in prompts) + max(budgets) - 1
    with torch.inference_mode():
        logits, cache = prefill(params, cfg, prompts, capacity)
    while True:
        with torch.inference_mode():
            tokens = choose(logits)
        step, budgets = _row_outputs(tokens.tolist(), budgets, eos_token_id)
        yield step
        if not any(budgets):
            return
        with torch.inference_mode():
            logits, cache = decode_step(params, cfg, cache, tokens)


def _row_outputs(
    tokens: list[int], budgets: list[int], eos_token_id: int | None
) -> tuple[list[int | None], list[int]]:
    """(what each row outputs for its chosen token, the budgets left): None for a row already stopped
    or stopping at EOS (its budget becomes 0)."""
    outputs: list[int | None] = []
    left = []
    for token, budget in zip(tokens, budgets, strict=True):
        stops_here = budget == 0 or token == eos_token_id
        outputs.append(None if stops_here else token)
        left.append(0 if stops_here else budget - 1)
    return outputs, left


def generate(
    params: Mapping[str, Any], cfg: ModelConfig, prompts: Sequence[Sequence[int]], **options: Any
) -> list[list[int]]:
    """The new tokens of every prompt (EOS excluded); keyword options as for `generate_stream`
    (max_new_tokens and eos_token_id are required)."""
    completions: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(params, cfg, prompts, **options):
        for completion, token in zip(completions, step, strict=True):
            if token is not None:
                completion.append(token)
    return completions
