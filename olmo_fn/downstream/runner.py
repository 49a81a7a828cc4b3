"""Running downstream tasks: naming and loading them, scoring them into metrics, and the whole
evaluation of a saved model (`run_downstream_eval`)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

from olmo_fn.downstream.next_line import next_line_task
from olmo_fn.downstream.pmi import pmi_accuracy
from olmo_fn.downstream.scoring import Encode, ScoreResult, score_questions
from olmo_fn.downstream.tasks import Question, read_task
from olmo_fn.errors import ConfigError
from olmo_fn.graph.config import ModelConfig

BUILTIN = "builtin:"
BUILTIN_TASKS = ("next-line",)
"""Built-in tasks, named ``builtin:NAME`` in a task list."""


def task_name(spec: str) -> str:
    """The name in the metrics: NAME for ``builtin:NAME``, else the file name without .jsonl/.json."""
    if spec.startswith(BUILTIN):
        return spec[len(BUILTIN) :]
    name = Path(spec).name
    for suffix in (".jsonl", ".json"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def task_problems(tasks: Sequence[str]) -> list[str]:
    """Every reason the task list `tasks` cannot run (files are only read later)."""
    problems = []
    if not tasks:
        problems.append("tasks is empty; give task files (JSON lines) or builtin:next-line")
    for spec in tasks:
        if spec.startswith(BUILTIN) and task_name(spec) not in BUILTIN_TASKS:
            known = ", ".join(BUILTIN + name for name in BUILTIN_TASKS)
            problems.append(f"tasks: unknown built-in task {spec!r} (known: {known})")
    names = [task_name(spec) for spec in tasks]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"tasks: more than one task is named {name!r} (metrics downstream/{name}/...)")
    return problems


@dataclasses.dataclass(frozen=True)
class DownstreamEvalConfig:
    """Multiple-choice evaluation of a saved model: accuracy on each task, raw and per byte."""

    checkpoint: str
    """A run directory (its newest checkpoint), a checkpoint, an olmo_fn export or a Hugging Face model."""
    tasks: tuple[str, ...] = ("builtin:next-line",)
    """JSON-lines task files (HellaSwag, ARC, PIQA or generic lines) and/or builtin:next-line."""
    max_questions: int | None = None
    """Score only the first this many questions of each task file; None: all of them."""
    builtin_questions: int = 500
    """Questions drawn for each built-in task."""
    seed: int = 0
    """Seeds the drawing of built-in tasks' questions."""
    batch_size: int = 32
    """(question, choice) rows per forward pass."""
    max_length: int | None = None
    """Most tokens per row (oldest context tokens dropped first), e.g. the training seq_len. None: no
    limit."""
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype. auto: bfloat16 on CUDA, float32 on CPU."""
    tokenizer: str | None = None
    """Override the model's tokenizer: "bytes" (built-in) or a tokenizer.json path."""
    pmi: bool = False
    """Also score each choice without its context and report acc_pmi: accuracy by how much the context
    raises a choice's log-likelihood (what a small model's context use shows in)."""

    def __post_init__(self) -> None:
        problems = task_problems(self.tasks)
        for name in ("builtin_questions", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_questions is not None and self.max_questions < 1:
            problems.append(f"max_questions={self.max_questions} must be >= 1 (or None for all)")
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"max_length={self.max_length} must be >= 2 (or None for no limit)")
        if problems:
            raise ConfigError("invalid downstream eval config: " + "; ".join(problems))


def load_tasks(
    tasks: Sequence[str], *, max_questions: int | None = None, builtin_questions: int = 500, seed: int = 0
) -> dict[str, list[Question]]:
    """Task name -> its questions, in the order given: the first `max_questions` of each file, and
    `builtin_questions` drawn with `seed` for each built-in task. ConfigError for a bad list or file."""
    problems = task_problems(tasks)
    if problems:
        raise ConfigError("; ".join(problems))
    loaded = {}
    for spec in tasks:
        if spec.startswith(BUILTIN):
            loaded[task_name(spec)] = next_line_task(builtin_questions, seed)
        else:
            loaded[task_name(spec)] = read_task(spec)[:max_questions]
    return loaded


def task_metrics(name: str, result: ScoreResult) -> dict[str, float]:
    """``downstream/NAME/acc`` and ``downstream/NAME/acc_norm``."""
    return {f"downstream/{name}/acc": result.accuracy, f"downstream/{name}/acc_norm": result.accuracy_norm}


def evaluate_downstream(
    params: Mapping[str, Any],
    cfg: ModelConfig,
    tasks: Mapping[str, Sequence[Question]],
    encode: Encode,
    *,
    pmi: bool = False,
    **score_options: Any,
) -> dict[str, float]:
    """The metrics of every task (`task_metrics`) for the given parameters: the in-loop entry point.
    With `pmi`, also ``downstream/NAME/acc_pmi`` (`olmo_fn.downstream.pmi`).

    `score_options` as for `score_questions`: batch_size, max_length, start_token, device."""
    metrics: dict[str, float] = {}
    for name, questions in tasks.items():
        result = score_questions(params, cfg, questions, encode, **score_options)
        metrics.update(task_metrics(name, result))
        if pmi:
            accuracy = pmi_accuracy(params, cfg, questions, encode, result, **score_options)
            metrics[f"downstream/{name}/acc_pmi"] = accuracy
    return metrics


def start_token_for(encode: Encode, eos_token_id: int | None) -> int | None:
    """The token put before every question: none when the tokenizer adds its own BOS (it encodes ""
    to something), else the end-of-text id, which comes before every document in the training data."""
    return None if encode("") else eos_token_id


def run_downstream_eval(cfg: DownstreamEvalConfig, out: TextIO = sys.stdout) -> dict[str, float]:
    """Load the model, score every task, print one line per task and return the metrics."""
    # Imported here: model loading imports the training config, which may come to import this module.
    from olmo_fn.generate import load_codec
    from olmo_fn.io.model_source import load_model
    from olmo_fn.runtime import resolve_device, resolve_dtype

    tasks = load_tasks(
        cfg.tasks, max_questions=cfg.max_questions, builtin_questions=cfg.builtin_questions, seed=cfg.seed
    )
    device = resolve_device(cfg.device)
    model = load_model(cfg.checkpoint, device=device, dtype=resolve_dtype(cfg.dtype, device))
    codec = load_codec(cfg.tokenizer, model.tokenizer, cfg.checkpoint)
    eos = model.eos_token_id if model.eos_token_id is not None else codec.eos_token_id
    metrics = evaluate_downstream(
        model.params,
        model.cfg,
        tasks,
        codec.encode,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        start_token=start_token_for(codec.encode, eos),
        device=device,
        pmi=cfg.pmi,
    )
    for name, questions in tasks.items():
        acc, acc_norm = metrics[f"downstream/{name}/acc"], metrics[f"downstream/{name}/acc_norm"]
        pmi = metrics.get(f"downstream/{name}/acc_pmi")
        shown = f"  acc_pmi {pmi:.4f}" if pmi is not None else ""
        count = f"({len(questions)} questions)"
        out.write(f"downstream/{name}: acc {acc:.4f}  acc_norm {acc_norm:.4f}{shown}  {count}\n")
    out.flush()
    return metrics
