"""Fine-tuning inputs for ``prepare-data --format``: JSON lines whose records say which text is trained on.

- ``prompt-completion``: ``{"prompt": str, "completion": str}``. The document is the prompt followed
  directly by the completion (no separator is added); the completion and the EOS after it are
  trained on, the prompt is context only.
- ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``. The
  document is every message as ``<|role|>\\n`` + content + ``\\n``, in order; the assistant messages'
  content (with its closing newline) is trained on, and the EOS too when the last message is the
  assistant's. Role headers, system and user messages are context only.

Each record becomes a list of `Segment`s, each encoded on its own (so a segment's tokens never merge
with its neighbours'), then framed like any document: ``[BOS] tokens EOS``, with a loss mask of one
flag per token (BOS untrained; EOS trained when the segment before it is).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

from olmo_fn.errors import DataError
from olmo_fn.io.text_sources import MalformedLine, TextSource, _json_failure
from olmo_fn.io.text_tokenizer import TextTokenizer

Format = Literal["text", "chat", "prompt-completion"]
CHAT_ROLES = ("system", "user", "assistant")
TRAINED_ROLE = "assistant"

Segment = tuple[str, bool]
"""(text, trained): a piece of a document and whether its tokens are trained on as targets."""


def chat_header(role: str) -> str:
    """The text that opens a message of `role` in the chat template."""
    return f"<|{role}|>\n"


def _shown(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 40 else text[:37] + "..."


def _type_problem(where: str, value: Any, expected: str) -> str:
    return f"{where} is {type(value).__name__} ({_shown(value)}), not {expected}"


def prompt_completion_segments(record: dict[str, Any]) -> tuple[list[Segment], str | None]:
    """(segments, None) of a prompt-completion record, or ([], why it is malformed)."""
    for field in ("prompt", "completion"):
        if field not in record:
            return [], f"no {field!r} field"
        if not isinstance(record[field], str):
            return [], _type_problem(repr(field), record[field], "a string")
    if not record["completion"]:
        return [], "'completion' is empty (nothing to train on)"
    return [(record["prompt"], False), (record["completion"], True)], None


def chat_segments(record: dict[str, Any]) -> tuple[list[Segment], str | None]:
    """(segments, None) of a chat record, or ([], why it is malformed)."""
    if "messages" not in record:
        return [], "no 'messages' field"
    messages = record["messages"]
    if not isinstance(messages, list):
        return [], _type_problem("'messages'", messages, "a list")
    segments: list[Segment] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            return [], _type_problem(where, message, "an object")
        for field in ("role", "content"):
            if field not in message:
                return [], f"{where}: no {field!r} field"
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            return [], f"{where}.role={_shown(role)} is not one of {', '.join(CHAT_ROLES)}"
        if not isinstance(content, str):
            return [], _type_problem(f"{where}.content", content, "a string")
        segments += [(chat_header(role), False), (content + "\n", role == TRAINED_ROLE)]
    if not any(m["role"] == TRAINED_ROLE for m in messages):
        return [], "no assistant message in 'messages' (nothing to train on)"
    return segments, None


PARSERS: dict[str, Callable[[dict[str, Any]], tuple[list[Segment], str | None]]] = {
    "prompt-completion": prompt_completion_segments,
    "chat": chat_segments,
}


class SupervisedSource(TextSource):
    """The records of one JSON-lines file in a fine-tuning format: `documents` yields each record's
    segments (a list of `Segment`) instead of a text; a record that does not fit the format goes to
    `on_malformed` as ``file:line: reason`` naming the field and its value."""

    def __init__(self, path: Path, fmt: str, on_malformed: Callable[[MalformedLine], None]):
        super().__init__(path, "", on_malformed)
        if not self.is_jsonl:
            raise DataError(
                f"{path}: prepare.format={fmt} reads JSON lines (.jsonl, .jsonl.gz, .jsonl.zst), "
                "not text files"
            )
        self._parse = PARSERS[fmt]

    def _record_text(self, line: bytes) -> tuple[Any, str | None]:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return [], _json_failure(line, exc)
        if not isinstance(record, dict):
            return [], f"expected a JSON object, got {type(record).__name__}"
        return self._parse(record)


def segment_text_bytes(documents: list[list[Segment]]) -> int:
    """UTF-8 bytes of all the text in `documents` (template included)."""
    return sum(len(text.encode("utf-8")) for segments in documents for text, _ in segments)


def encode_segments(
    tokenizer: TextTokenizer, documents: list[list[Segment]]
) -> tuple[list[np.ndarray], list[np.ndarray], list[bool]]:
    """(token ids, trained flag per token, whether the EOS is trained) of each document, every
    segment encoded on its own."""
    flat = tokenizer.encode_batch([text for segments in documents for text, _ in segments])
    ids, masks, eos_trained = [], [], []
    at = 0
    for segments in documents:
        pieces = flat[at : at + len(segments)]
        at += len(segments)
        flags = [np.full(len(p), trained) for p, (_, trained) in zip(pieces, segments, strict=True)]
        ids.append(np.concatenate(pieces) if pieces else np.empty(0, np.int64))
        masks.append(np.concatenate(flags) if flags else np.empty(0, bool))
        eos_trained.append(bool(segments and segments[-1][1]))
    return ids, masks, eos_trained


def frame_loss_mask(masks: list[np.ndarray], eos_trained: list[bool], has_bos: bool) -> np.ndarray:
    """The uint8 loss mask of documents framed as ``[BOS] tokens EOS`` (see `frame_documents`): each
    document's token flags, 0 for the BOS, and its `eos_trained` flag for the EOS."""
    extra = 2 if has_bos else 1
    lengths = np.array([len(m) for m in masks], dtype=np.int64) + extra
    ends = np.cumsum(lengths)
    out = np.zeros(int(ends[-1]) if len(ends) else 0, dtype=np.uint8)
    is_body = np.ones(out.size, dtype=bool)
    is_body[ends - 1] = False
    if has_bos:
        is_body[ends - lengths] = False
    out[is_body] = np.concatenate(masks) if masks else []
    out[ends - 1] = eos_trained
    return out
