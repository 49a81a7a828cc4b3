"""Accuracy by pointwise mutual information (``acc_pmi``): each choice is scored by how much the context
raises its log-likelihood, log p(choice | context) - log p(choice | no context), and the highest wins.

A choice that is likely anywhere (a common-looking line of code, a short frequent word) gains nothing
from being likely; only what the model reads in the context counts. A small model ranks choices mostly
by such prior likelihood, so its raw and per-byte accuracy can sit at or below chance while it does use
the context; this score shows that use (Holtzman et al. 2021, "surface form competition").

"No context" is the choice read right after the start token (or the tokenizer's own BOS), tokenized as
``encode(choice)``; for the byte tokenizer that is exactly its tokens in context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from olmo_fn.downstream.scoring import Encode, ScoreResult, first_argmax, score_questions
from olmo_fn.downstream.tasks import Question
from olmo_fn.graph.config import ModelConfig


def without_context(questions: Sequence[Question]) -> list[Question]:
    """The same questions with an empty context."""
    return [dataclasses.replace(q, context="") for q in questions]


def pmi_chosen(in_context: ScoreResult, alone: ScoreResult) -> tuple[int, ...]:
    """Per question: the choice whose log-likelihood the context raises most (lowest index on ties)."""
    return tuple(
        first_argmax([a - b for a, b in zip(with_ctx, bare, strict=True)])
        for with_ctx, bare in zip(in_context.log_likelihoods, alone.log_likelihoods, strict=True)
    )


def pmi_accuracy(
    params: Mapping[str, Any],
    cfg: ModelConfig,
    questions: Sequence[Question],
    encode: Encode,
    in_context: ScoreResult,
    **score_options: Any,
) -> float:
    """The share of `questions` whose PMI choice is right; `in_context` is their `score_questions` result,
    `score_options` as for it (the same start token, so the choices stand alone after it)."""
    alone = score_questions(params, cfg, without_context(questions), encode, **score_options)
    chosen = pmi_chosen(in_context, alone)
    return sum(c == a for c, a in zip(chosen, in_context.answers, strict=True)) / len(questions)
