"""Scoring multiple-choice questions by the log-likelihood a model gives each choice.

Tokenisation: ``context`` and ``context + choice`` are each encoded whole, and the choice's tokens are
the second encoding's tokens after the longest prefix it shares with the first. So a choice is split
into tokens as it would be in running text: a word-level BPE tokenizer merges the leading space into
the choice's first word, and a tokenizer that adds a BOS adds it once, at the start. (Encoding the
choice alone would lose that merge or put a second BOS in the middle.) When a merge crosses the
boundary, the token holding it counts as the choice's. For the byte tokenizer both ways agree.

Log-likelihood of a choice: the sum over its tokens of log p(token | everything before it), computed
in the parameters' dtype and summed in float64. Length-normalised: that sum divided by the number of
UTF-8 bytes of the choice text, which does not depend on the tokenizer. Ties go to the lowest index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from olmo_fn.downstream.tasks import Question
from olmo_fn.errors import ConfigError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.model import head_params, hidden_states, lm_head

Encode = Callable[[str], list[int]]
Row = tuple[list[int], int]
"""The token ids one forward pass reads for one (question, choice), and how many of the last of them
are the choice's."""


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Per-question log-likelihoods of every choice and what the model picks from them."""

    log_likelihoods: tuple[tuple[float, ...], ...]
    """[question][choice]: summed log-probability (nats) of the choice's tokens given the context."""
    choice_bytes: tuple[tuple[int, ...], ...]
    """[question][choice]: UTF-8 bytes of the choice text (the length normaliser)."""
    choice_tokens: tuple[tuple[int, ...], ...]
    """[question][choice]: how many tokens were scored."""
    answers: tuple[int, ...]
    chosen: tuple[int, ...]
    """Per question: the choice of highest log-likelihood."""
    chosen_norm: tuple[int, ...]
    """Per question: the choice of highest log-likelihood per byte."""

    @property
    def accuracy(self) -> float:
        return sum(c == a for c, a in zip(self.chosen, self.answers, strict=True)) / len(self.answers)

    @property
    def accuracy_norm(self) -> float:
        return sum(c == a for c, a in zip(self.chosen_norm, self.answers, strict=True)) / len(self.answers)


def first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the lowest index on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def split_tokens(
    encode: Encode, context: str, choice: str, context_ids: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """(context tokens, choice tokens): ``encode(context + choice)`` cut after the longest prefix it
    shares with ``encode(context)`` (`context_ids`, when the caller has encoded it already)."""
    context_ids = encode(context) if context_ids is None else context_ids
    full = encode(context + choice)
    shared = 0
    for a, b in zip(context_ids, full, strict=False):
        if a != b:
            break
        shared += 1
    return list(full[:shared]), list(full[shared:])


def make_row(
    context: list[int], choice: list[int], start_token: int | None, max_length: int | None, where: str
) -> Row:
    """The row for one choice: ``[start_token] + context + choice``, cut from the left to `max_length`.

    ConfigError (prefixed by `where`) when the choice has no tokens or nothing is left to predict its
    first token from."""
    ids = ([] if start_token is None else [start_token]) + context + choice
    if not choice:
        raise ConfigError(f"{where}: the choice encodes to no tokens of its own")
    if len(ids) == len(choice):
        raise ConfigError(
            f"{where}: the context encodes to no tokens; pass a start token (e.g. the end-of-text id)"
        )
    if max_length is not None and len(choice) >= max_length:
        raise ConfigError(
            f"{where}: the choice is {len(choice)} tokens; max_length={max_length} leaves no room for context"
        )
    return (ids if max_length is None else ids[-max_length:]), len(choice)


def question_rows(
    questions: Sequence[Question], encode: Encode, start_token: int | None, max_length: int | None, vocab: int
) -> list[list[Row]]:
    """[question][choice] rows; ConfigError for ids outside the model's vocabulary."""
    rows = []
    for q_index, question in enumerate(questions):
        rows.append([])
        context_ids = encode(question.context)  # once per question, not per choice
        for c_index, choice in enumerate(question.choices):
            where = f"question {q_index} choice {c_index}"
            parts = split_tokens(encode, question.context, choice, context_ids)
            row = make_row(*parts, start_token, max_length, where)
            if max(row[0]) >= vocab or min(row[0]) < 0:
                bad = max(row[0]) if max(row[0]) >= vocab else min(row[0])
                raise ConfigError(f"{where}: token id {bad} is outside the model's vocabulary of {vocab}")
            rows[-1].append(row)
    return rows


def batch_log_likelihoods(
    params: Mapping[str, Any], cfg: ModelConfig, rows: Sequence[Row], device: torch.device
) -> list[float]:
    """Summed log-probability of each row's last n tokens, one forward pass for all rows.

    Rows are padded on the right with id 0; causal attention keeps padding out of real positions.
    Only positions that predict a choice token go through the LM head."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)  # position p predicts token p + 1
    for r, (tokens, n_choice) in enumerate(rows):
        ids[r, : len(tokens)] = torch.tensor(tokens)
        scored[r, len(tokens) - n_choice - 1 : len(tokens) - 1] = True
    targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)[scored]  # (n,)
    h = hidden_states(params, ids.to(device), cfg)[scored.to(device)]  # (n, d_model)
    out = lm_head(head_params(params, cfg), h, cfg)  # (n, vocab)
    logp = out.to(torch.promote_types(out.dtype, torch.float32)).log_softmax(-1)
    token_logp = logp.gather(1, targets.to(device)[:, None])[:, 0].double().cpu()
    sums = torch.zeros(len(rows), dtype=torch.float64)
    sums.index_add_(0, scored.nonzero()[:, 0], token_logp)
    return sums.tolist()


def rows_log_likelihoods(
    params: Mapping[str, Any], cfg: ModelConfig, rows: Sequence[Row], batch_size: int, device: torch.device
) -> list[float]:
    """`batch_log_likelihoods` of every row, `batch_size` rows per pass, longest rows first (so rows of
    similar length share a batch and padding stays small)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        part = order[start : start + batch_size]
        for i, value in zip(
            part, batch_log_likelihoods(params, cfg, [rows[i] for i in part], device), strict=True
        ):
            out[i] = value
    return out


def score_questions(
    params: Mapping[str, Any],
    cfg: ModelConfig,
    questions: Sequence[Question],
    encode: Encode,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    start_token: int | None = None,
    device: str | torch.device | None = None,
) -> ScoreResult:
    """Score every choice of every question (see the module docstring) under inference mode.

    batch_size: (question, choice) rows per forward pass. max_length: most tokens per row, older
    context tokens dropped first (e.g. the training sequence length); None: no limit. start_token:
    put before every context (the end-of-text id, so each question reads as a document start, for a
    tokenizer that adds no BOS of its own). device: where the inputs go; default the parameters'.
    """
    if not questions:
        raise ConfigError("no questions to score")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    device = torch.device(device) if device is not None else params["embeddings"].device
    per_question = question_rows(questions, encode, start_token, max_length, cfg.vocab_size)
    flat = [row for rows in per_question for row in rows]
    with torch.inference_mode():
        values = iter(rows_log_likelihoods(params, cfg, flat, batch_size, device))
    lls = tuple(tuple(next(values) for _ in q.choices) for q in questions)
    sizes = tuple(tuple(len(c.encode("utf-8")) for c in q.choices) for q in questions)
    return ScoreResult(
        log_likelihoods=lls,
        choice_bytes=sizes,
        choice_tokens=tuple(tuple(n for _, n in rows) for rows in per_question),
        answers=tuple(q.answer for q in questions),
        chosen=tuple(first_argmax(ll) for ll in lls),
        chosen_norm=tuple(
            first_argmax([v / n for v, n in zip(ll, s, strict=True)])
            for ll, s in zip(lls, sizes, strict=True)
        ),
    )
