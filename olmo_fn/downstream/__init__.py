"""Downstream multiple-choice evaluation: does the model give the right continuation the highest
log-likelihood?

- `tasks`: `Question` and `read_task` (HellaSwag, ARC, PIQA and generic JSON lines).
- `scoring`: `score_questions` -> `ScoreResult` (accuracy, and accuracy per byte of the choice).
- `next_line`: the built-in task from the embedded corpus's held-out split.
- `runner`: `DownstreamEvalConfig` and `run_downstream_eval` (a saved model), `load_tasks` and
  `evaluate_downstream` (parameters in memory, as in a training loop).

Typical use::

    tasks = load_tasks(["builtin:next-line", "tasks/arc_easy.jsonl"], max_questions=200)
    metrics = evaluate_downstream(params, cfg, tasks, byte_codec().encode, start_token=BYTE_EOS)
    # {"downstream/next-line/acc": ..., "downstream/next-line/acc_norm": ..., "downstream/arc_easy/acc": ...}
"""

from olmo_fn.downstream.next_line import next_line_task
from olmo_fn.downstream.runner import (
    BUILTIN_TASKS,
    DownstreamEvalConfig,
    evaluate_downstream,
    load_tasks,
    run_downstream_eval,
    start_token_for,
    task_metrics,
    task_name,
)
from olmo_fn.downstream.scoring import ScoreResult, score_questions
from olmo_fn.downstream.tasks import Question, read_task

__all__ = [
    "BUILTIN_TASKS",
    "DownstreamEvalConfig",
    "Question",
    "ScoreResult",
    "evaluate_downstream",
    "load_tasks",
    "next_line_task",
    "read_task",
    "run_downstream_eval",
    "score_questions",
    "start_token_for",
    "task_metrics",
    "task_name",
]
