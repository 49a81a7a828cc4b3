"""Multiple-choice questions and reading them from JSON-lines task files.

Each line of a task file is one question; its format is told by its fields, line by line:

- HellaSwag: ``ctx`` (or ``ctx_a`` and ``ctx_b``), ``endings``, ``label``. Context: ``ctx``, else
  ``ctx_a + " " + ctx_b``; no activity label and no clean-up of the ``[title]``-style markers.
- ARC: ``question: {stem, choices: [{text, label}]}`` and ``answerKey`` (a letter or a digit, matched
  against the choice labels); the Hugging Face layout (``question`` a string, ``choices: {text: [...],
  label: [...]}``) is read too. Context: ``"Question: " + stem + "\\nAnswer:"``.
- PIQA: ``goal``, ``sol1``, ``sol2``, ``label`` (0 or 1). Context: ``"Question: " + goal + "\\nAnswer:"``.
- generic: ``context``, ``choices`` (strings), ``answer`` (the index of the right one).

Spacing: in the HellaSwag, ARC and PIQA formats the context loses its trailing spaces and each choice
becomes ``" " + text`` (its own leading spaces removed), so exactly one space joins them and it belongs
to the choice, where word-level tokenizers put it. Generic choices are scored exactly as written: the
file decides the spacing. Labels may be integers or digit strings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from olmo_fn.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice question: each choice is scored as a continuation of `context`."""

    context: str
    choices: tuple[str, ...]
    """At least two non-empty continuations, each with whatever leading space it is scored with."""
    answer: int
    """Index of the right choice."""

    def __post_init__(self) -> None:
        problem = choices_problem(self.choices) or answer_problem(self.answer, len(self.choices))
        if problem:
            raise ConfigError(f"invalid question: {problem}")


def choices_problem(choices: Any) -> str | None:
    """Why `choices` cannot be a question's choices (a tuple of >= 2 non-empty strings), or None."""
    if not isinstance(choices, tuple) or not all(isinstance(c, str) for c in choices):
        return f"choices {show(choices)} must be a tuple of strings"
    if len(choices) < 2:
        return f"choices {show(choices)} must hold at least 2 choices"
    empty = [i for i, c in enumerate(choices) if not c]
    return f"choices[{empty[0]}] is empty" if empty else None


def answer_problem(answer: Any, n_choices: int) -> str | None:
    """Why `answer` cannot index `n_choices` choices, or None."""
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < n_choices:
        return f"answer {show(answer)} is not a choice index 0..{n_choices - 1}"
    return None


def show(value: Any, limit: int = 80) -> str:
    """`value`'s repr on one line, cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LineError(Exception):
    """A problem with one line, before its file and line number are known."""


def read_task(path: str | Path) -> list[Question]:
    """The questions of the JSON-lines file at `path`, in file order (blank lines skipped).

    Every problem is a one-line ConfigError starting ``path:line:`` that names the field and value.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot read ({exc})"
        raise ConfigError(f"{path}: {reason} (a task is a JSON-lines file or builtin:NAME)") from None
    questions = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            questions.append(parse_line(line))
        except LineError as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from None
    if not questions:
        raise ConfigError(f"{path}: holds no questions (expected one JSON object per line)")
    return questions


def parse_line(line: bytes) -> Question:
    """The question one JSON line holds; LineError says what is wrong with it."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise LineError(f"not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(record, dict):
        raise LineError(f"expected a JSON object, got {show(record)}")
    return format_parser(record)(record)


def format_parser(record: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], Question]:
    """The parser of the format `record`'s fields belong to."""
    if "endings" in record:
        return hellaswag_question
    if "answerKey" in record:
        return arc_question
    if "goal" in record or "sol1" in record:
        return piqa_question
    if "choices" in record or "context" in record:
        return generic_question
    raise LineError(
        f"fields {', '.join(sorted(record)) or '(none)'} match no task format: expected HellaSwag (ctx, "
        "endings, label), ARC (question, answerKey), PIQA (goal, sol1, sol2, label) or generic "
        "(context, choices, answer)"
    )


def field(record: Mapping[str, Any], name: str, fmt: str) -> Any:
    """``record[name]``; LineError naming the format when it is missing."""
    if name not in record:
        raise LineError(f"missing field {name!r} ({fmt} format)")
    return record[name]


def text_field(record: Mapping[str, Any], name: str, fmt: str, *, allow_empty: bool = False) -> str:
    """``record[name]`` as a string (non-empty unless `allow_empty`)."""
    value = field(record, name, fmt)
    if not isinstance(value, str) or not (value.strip() or allow_empty):
        raise LineError(f"{name} {show(value)} must be a non-empty string")
    return value


def text_list(value: Any, name: str) -> list[str]:
    """`value` as a list of at least 2 non-empty strings."""
    if not isinstance(value, list) or len(value) < 2:
        raise LineError(f"{name} {show(value)} must be a list of at least 2 strings")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise LineError(f"{name}[{i}] {show(item)} must be a non-empty string")
    return value


def label_index(value: Any, n_choices: int, name: str) -> int:
    """An integer or digit-string label as an index into `n_choices` choices."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_choices:
        raise LineError(f"{name} {show(value)} is not a choice index 0..{n_choices - 1}")
    return value


def spaced(context: str, texts: list[str], answer: int) -> Question:
    """A question whose choices each follow `context` after exactly one space."""
    choices = tuple(" " + text.lstrip(" ") for text in texts)
    return Question(context.rstrip(" "), choices, answer)


def hellaswag_question(record: Mapping[str, Any]) -> Question:
    """HellaSwag: context ``ctx`` (else ``ctx_a + " " + ctx_b``), choices ``endings``, ``label``."""
    fmt = "HellaSwag"
    if "ctx" in record:
        context = text_field(record, "ctx", fmt)
    else:
        context = text_field(record, "ctx_a", fmt)
        tail = text_field(record, "ctx_b", fmt, allow_empty=True)
        context = f"{context} {tail}" if tail.strip() else context
    endings = text_list(field(record, "endings", fmt), "endings")
    return spaced(context, endings, label_index(field(record, "label", fmt), len(endings), "label"))


def arc_question(record: Mapping[str, Any]) -> Question:
    """ARC: ``"Question: stem\\nAnswer:"``, the choices' texts; ``answerKey`` names a choice label."""
    question = field(record, "question", "ARC")
    if isinstance(question, dict):
        stem = text_field(question, "stem", "ARC question")
        texts, labels = arc_choice_list(field(question, "choices", "ARC question"))
    else:
        stem = text_field(record, "question", "ARC")
        texts, labels = arc_choice_columns(field(record, "choices", "ARC"))
    key = field(record, "answerKey", "ARC")
    if not isinstance(key, str | int) or isinstance(key, bool) or str(key).strip() not in labels:
        raise LineError(f"answerKey {show(key)} is not one of the choice labels {', '.join(labels)}")
    return spaced(f"Question: {stem}\nAnswer:", texts, labels.index(str(key).strip()))


def arc_choice_list(choices: Any) -> tuple[list[str], list[str]]:
    """Texts and labels of ARC's ``[{text, label}, ...]``."""
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise LineError(f"question.choices {show(choices)} must be a list of {{text, label}} objects")
    texts = text_list([c.get("text") for c in choices], "question.choices text")
    return texts, arc_labels([c.get("label") for c in choices], "question.choices label")


def arc_choice_columns(choices: Any) -> tuple[list[str], list[str]]:
    """Texts and labels of the Hugging Face layout ``{text: [...], label: [...]}``."""
    if not isinstance(choices, dict):
        raise LineError(f"choices {show(choices)} must be an object {{text: [...], label: [...]}}")
    texts = text_list(field(choices, "text", "ARC choices"), "choices.text")
    labels = field(choices, "label", "ARC choices")
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise LineError(f"choices.label {show(labels)} must be a list of {len(texts)} labels")
    return texts, arc_labels(labels, "choices.label")


def arc_labels(labels: list[Any], name: str) -> list[str]:
    """Distinct string (or integer) labels, as strings."""
    for label in labels:
        if not isinstance(label, str | int) or isinstance(label, bool) or not str(label).strip():
            raise LineError(f"{name} {show(label)} must be a letter or a digit")
    shown = [str(label).strip() for label in labels]
    if len(set(shown)) != len(shown):
        raise LineError(f"{name}s {show(shown)} repeat a label")
    return shown


def piqa_question(record: Mapping[str, Any]) -> Question:
    """PIQA: ``"Question: goal\\nAnswer:"``, choices ``sol1`` and ``sol2``, ``label`` 0 or 1."""
    goal = text_field(record, "goal", "PIQA")
    solutions = [text_field(record, name, "PIQA") for name in ("sol1", "sol2")]
    return spaced(
        f"Question: {goal}\nAnswer:", solutions, label_index(field(record, "label", "PIQA"), 2, "label")
    )


def generic_question(record: Mapping[str, Any]) -> Question:
    """generic: ``context``, ``choices`` scored verbatim, ``answer`` an index."""
    context = field(record, "context", "generic")
    if not isinstance(context, str):
        raise LineError(f"context {show(context)} must be a string")
    choices = field(record, "choices", "generic")
    if not isinstance(choices, list) or len(choices) < 2:
        raise LineError(f"choices {show(choices)} must be a list of at least 2 strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise LineError(f"choices[{i}] {show(choice)} must be a non-empty string")
    answer = field(record, "answer", "generic")
    problem = answer_problem(answer, len(choices))
    if problem:
        raise LineError(problem)
    return Question(context, tuple(choices), answer)
