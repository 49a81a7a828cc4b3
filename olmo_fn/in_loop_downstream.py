"""Downstream accuracy during training: the tasks of ``eval.downstream``, loaded once before the loop and
scored with the current parameters at every evaluation: ``downstream/TASK/acc``, ``.../acc_norm`` and
``.../acc_pmi`` (`olmo_fn.downstream.pmi`: the tiny default model ranks next-line choices by how common
they look, at chance, while the context already moves its choice well above chance).

Questions are encoded with the run's tokenizer (``data.tokenizer``) and each starts after the end-of-text
id, as documents do in the training data; rows longer than ``data.seq_len`` lose their oldest context
tokens. A built-in task's question with a choice of ``data.seq_len`` tokens or more cannot be scored
and is left out (so short sequences score fewer questions); in a task file it is an error. With
``data.seq_len`` >= 256 the built-in questions are those ``eval --builtin-questions N --max-length
SEQ_LEN`` scores. Under a placement plan every rank gathers the full parameters (``DTensor.full_tensor``, a
collective) and scores every question itself, so each holds the same metrics; the gathered copy costs one
full model of memory per rank while it is scored. Pipeline parallelism is refused: a rank holds only its
stages' parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from olmo_fn.config import TrainConfig
from olmo_fn.downstream import Question, evaluate_downstream, load_tasks, start_token_for
from olmo_fn.downstream.runner import BUILTIN
from olmo_fn.downstream.scoring import Encode, question_rows, split_tokens
from olmo_fn.errors import ConfigError
from olmo_fn.generate import TextCodec, byte_codec, tokenizer_json_codec
from olmo_fn.graph.config import ModelConfig
from olmo_fn.io.model_source import tokenizer_of

DEFAULT_TASKS = ("builtin:next-line",)
"""What ``eval.downstream=None`` means for a run on the embedded corpus."""
QUESTION_SEED = 0
"""Built-in tasks draw the same questions in every run, whatever its seed, so runs compare."""


@dataclasses.dataclass(frozen=True)
class LoopTasks:
    """Everything scoring needs besides the parameters, fixed for the whole run."""

    tasks: Mapping[str, Sequence[Question]]
    encode: Encode
    start_token: int | None
    max_length: int
    batch_size: int


def downstream_specs(cfg: TrainConfig) -> tuple[str, ...]:
    """The task list a run scores: ``eval.downstream``, or for None the built-in next-line task when the
    run trains on the embedded corpus without pipeline parallelism (else none)."""
    if cfg.eval.downstream is not None:
        return cfg.eval.downstream
    embedded = not (cfg.data.paths or cfg.data.sources)
    return DEFAULT_TASKS if embedded and cfg.parallel.pp == 1 else ()


def run_codec(cfg: TrainConfig) -> TextCodec:
    """The tokenizer the run's token files were made with."""
    if cfg.data.tokenizer == "bytes":
        return byte_codec()
    return tokenizer_json_codec(cfg.data.tokenizer, source="data.tokenizer")


def open_loop_tasks(cfg: TrainConfig) -> LoopTasks | None:
    """The run's downstream tasks, read, encoded and checked against the model's vocabulary; None when
    there are none or evaluation is off. ConfigError (one line, naming the task) before training starts
    for a missing or malformed task file, a token id outside the vocabulary, or pipeline parallelism."""
    specs = downstream_specs(cfg)
    if not specs or cfg.eval.interval == 0:
        return None
    if cfg.parallel.pp > 1:
        raise ConfigError(
            f"eval.downstream={' '.join(specs)} is not supported under parallel.pp={cfg.parallel.pp} (a rank "
            "holds only its stages' parameters): pass --eval.downstream with no task"
        )
    n = cfg.eval.downstream_questions
    loaded = load_tasks(specs, max_questions=n, builtin_questions=n, seed=QUESTION_SEED)
    codec = run_codec(cfg)
    _, eos = tokenizer_of(cfg)
    start_token, max_length = start_token_for(codec.encode, eos), cfg.data.seq_len
    tasks = {}
    for spec, (name, questions) in zip(specs, loaded.items(), strict=True):
        if spec.startswith(BUILTIN):
            questions = [q for q in questions if fits(q, codec.encode, max_length)]
            if not questions:
                if cfg.eval.downstream is None:
                    continue  # the default task does not fit this run's sequences: none
                raise ConfigError(
                    f"eval.downstream task {name!r}: no question has choices shorter than "
                    f"data.seq_len={max_length} tokens"
                )
        try:
            question_rows(questions, codec.encode, start_token, max_length, cfg.model.vocab_size)
        except ConfigError as exc:
            raise ConfigError(f"eval.downstream task {name!r}: {exc}") from None
        tasks[name] = questions
    if not tasks:
        return None
    return LoopTasks(tasks, codec.encode, start_token, max_length, cfg.eval.batch_size)


def fits(question: Question, encode: Encode, max_length: int) -> bool:
    """Whether every choice of `question` leaves room for context in `max_length` tokens."""
    return all(len(split_tokens(encode, question.context, c)[1]) < max_length for c in question.choices)


@torch.no_grad()
def full_params(params: Any) -> Any:
    """`params` with every DTensor leaf gathered into a whole local tensor (a collective: every rank
    must call it); plain tensors are returned as they are."""
    return params.apply(lambda t: t.full_tensor() if isinstance(t, DTensor) else t)


def downstream_metrics(
    params: Any, loop: LoopTasks, model: ModelConfig, device: torch.device
) -> dict[str, float]:
    """``downstream/TASK/acc``, ``.../acc_norm`` and ``.../acc_pmi`` of every task for the current
    parameters."""
    return evaluate_downstream(
        full_params(params),
        model,
        loop.tasks,
        loop.encode,
        batch_size=loop.batch_size,
        max_length=loop.max_length,
        start_token=loop.start_token,
        device=device,
        pmi=True,
    )
