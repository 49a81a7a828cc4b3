"""The built-in task "next-line": which line of Python comes next, from the embedded corpus's held-out
split (the standard-library files `stdlib_token_file("validation")` is built from).

A question is a place in one file: the context is the lines before it (newline-terminated), the right
choice is the line itself, without its newline. Answer lines are non-blank and their stripped text
occurs exactly once in the whole split, so no answer is boilerplate (``else:``, ``return None``) and
none can be copied from elsewhere. Distractors are lines that could be answers themselves (non-blank,
unique in the split) from other files, re-indented like the answer (so indentation alone does not give
the answer away) and never equal to it once stripped. Drawing them from the answers' own population
keeps a scorer that ignores the context at chance: unique lines are rarer-looking than lines at large,
and distractors drawn from all lines made such a scorer (e.g. byte unigram frequencies) pick a
distractor far more often than chance.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections import Counter

from olmo_fn.downstream.tasks import Question
from olmo_fn.errors import ConfigError
from olmo_fn.io.stdlib_corpus import TRAIN_BYTES, VALIDATION_BYTES, select_stdlib_sources


@dataclasses.dataclass(frozen=True)
class Place:
    """Line `line` of file `file` (indices into `validation_lines()`)."""

    file: int
    line: int


@functools.lru_cache(maxsize=1)
def validation_lines() -> tuple[tuple[str, ...], ...]:
    """The lines (split on "\\n" only) of each file of the embedded corpus's validation split."""
    sources = select_stdlib_sources(VALIDATION_BYTES, skip_bytes=TRAIN_BYTES)
    return tuple(tuple(data.decode("utf-8").split("\n")) for _, data in sources)


@functools.lru_cache(maxsize=1)
def answer_places() -> tuple[Place, ...]:
    """Every line that can be an answer: non-blank, stripped text unique in the split, and a non-blank
    line among the ones before it in its file."""
    files = validation_lines()
    counts = Counter(line.strip() for lines in files for line in lines)
    places = []
    for f, lines in enumerate(files):
        seen_text = False
        for i, line in enumerate(lines):
            if seen_text and line.strip() and counts[line.strip()] == 1:
                places.append(Place(f, i))
            seen_text = seen_text or bool(line.strip())
    return tuple(places)


def line_at(place: Place) -> str:
    return validation_lines()[place.file][place.line]


def distractors(answer: Place, count: int, rng: random.Random) -> list[str]:
    """`count` distinct answer-pool lines from files other than the answer's, indented like the answer,
    none equal to it once stripped."""
    text = line_at(answer)
    indent = text[: len(text) - len(text.lstrip())]
    pool, chosen = answer_places(), []
    for _ in range(1000 * count):
        other = pool[rng.randrange(len(pool))]
        stripped = line_at(other).strip()
        if other.file != answer.file and stripped != text.strip() and indent + stripped not in chosen:
            chosen.append(indent + stripped)
            if len(chosen) == count:
                return chosen
    raise ConfigError(f"next-line: found too few distinct lines for {count} distractors")


def next_line_task(n_questions: int, seed: int, n_choices: int = 4, context_lines: int = 8) -> list[Question]:
    """`n_questions` next-line questions of `n_choices` choices, the same for the same arguments (and
    Python installation). Context: up to `context_lines` lines before the answer line."""
    if n_questions < 1 or n_choices < 2 or context_lines < 1:
        raise ConfigError(
            f"next-line: n_questions={n_questions} must be >= 1, n_choices={n_choices} >= 2 and "
            f"context_lines={context_lines} >= 1"
        )
    places = answer_places()
    if n_questions > len(places):
        raise ConfigError(f"next-line: n_questions={n_questions} is more than the {len(places)} available")
    rng = random.Random(seed)
    questions = []
    for place in rng.sample(places, n_questions):
        lines = validation_lines()[place.file]
        context = "".join(line + "\n" for line in lines[max(0, place.line - context_lines) : place.line])
        choices = distractors(place, n_choices - 1, rng)
        answer = rng.randrange(n_choices)
        choices.insert(answer, line_at(place))
        questions.append(Question(context, tuple(choices), answer))
    return questions
