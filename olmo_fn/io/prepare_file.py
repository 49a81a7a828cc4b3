"""One input file of `prepare-data` turned into its outputs: the token array, the offsets sidecar, and
last the completion record that marks both whole.

Reading is `olmo_fn.io.text_sources`, encoding `olmo_fn.io.text_tokenizer`; this module frames the
documents with BOS/EOS, checks that ids fit the dtype, and writes every file atomically.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from olmo_fn.errors import DataError
from olmo_fn.io.atomic import atomic_write, atomic_write_bytes, write_json
from olmo_fn.io.text_sources import MalformedLine, TextSource
from olmo_fn.io.text_tokenizer import TextTokenizer
from olmo_fn.io.token_file import TOKEN_DTYPES

BATCH_DOCUMENTS = 1024
BATCH_CHARS = 4 << 20
MALFORMED_SHOWN = 10

Report = Callable[[int, int, int], None]
"""report(documents, tokens, input bytes read): one batch's progress, for the display."""


@dataclasses.dataclass(frozen=True)
class OutputFiles:
    """The three files made from one input; `record` is written last and marks the others complete."""

    tokens: Path
    offsets: Path
    record: Path

    @classmethod
    def for_stem(cls, output_dir: Path, stem: str) -> OutputFiles:
        tokens = output_dir / f"{stem}.npy"
        return cls(tokens, output_dir / f"{stem}.npy.csv.gz", output_dir / f"{stem}.npy.done.json")

    def all(self) -> tuple[Path, Path, Path]:
        return (self.record, self.offsets, self.tokens)


@dataclasses.dataclass(frozen=True)
class FileJob:
    """Everything a worker needs to turn one input file into its outputs."""

    input: Path
    outputs: OutputFiles
    key: dict[str, Any]
    """The completion record's identifying fields: input size and mtime, tokenizer, ids, dtype, field."""
    strict: bool

    @property
    def dtype(self) -> np.dtype:
        return TOKEN_DTYPES[self.key["dtype"]]


@dataclasses.dataclass(frozen=True)
class FileResult:
    """What one input file gave: counts, and the first malformed lines as ``file:line: reason``."""

    documents: int
    tokens: int
    text_bytes: int
    empty_documents: int
    malformed_lines: int
    malformed_examples: tuple[str, ...]


def is_complete(job: FileJob) -> bool:
    """Whether `job`'s outputs are whole and were made from the same input file and settings."""
    try:
        record = orjson.loads(job.outputs.record.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in job.key.items()):
        return False
    if job.strict and record.get("malformed_lines"):
        return False  # made by skipping lines that strict mode refuses
    tokens, offsets = job.outputs.tokens, job.outputs.offsets
    expected_size = record.get("tokens", -1) * job.dtype.itemsize
    return offsets.is_file() and tokens.is_file() and tokens.stat().st_size == expected_size


# ---- one input file -----------------------------------------------------------------------------


class MalformedLog:
    """Counts malformed lines and keeps the first few; in strict mode the first one is a DataError."""

    def __init__(self, strict: bool):
        self.strict, self.count, self.examples = strict, 0, []

    def add(self, line: MalformedLine) -> None:
        if self.strict:
            raise DataError(f"{line} (prepare.strict is set)")
        self.count += 1
        if len(self.examples) < MALFORMED_SHOWN:
            self.examples.append(str(line))


def prepare_file(job: FileJob, tokenizer: TextTokenizer, report: Report) -> FileResult:
    """Tokenize `job.input` into its three output files. An earlier run's outputs are removed first
    (its completion record before the rest), and on any failure none of the files is left."""
    for path in job.outputs.all():
        path.unlink(missing_ok=True)
    _remove_stale_temporaries(job.outputs)
    try:
        return _write_outputs(job, tokenizer, report)
    except BaseException:
        for path in job.outputs.all():
            path.unlink(missing_ok=True)
        raise


def _remove_stale_temporaries(outputs: OutputFiles) -> None:
    """Remove what a killed run left beside the outputs (`atomic_write` names it ``.NAME.*.tmp``)."""
    for path in outputs.all():
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            leftover.unlink(missing_ok=True)


def _write_outputs(job: FileJob, tokenizer: TextTokenizer, report: Report) -> FileResult:
    malformed = MalformedLog(job.strict)
    source = TextSource(job.input, job.key["text_field"], malformed.add)
    lengths: list[np.ndarray] = []
    text_bytes = 0

    def write_tokens(tmp: Path) -> None:
        nonlocal text_bytes
        read = 0
        with open(tmp, "wb") as out:
            for texts in _batches(source.documents()):
                tokens, doc_lengths = frame_documents(
                    tokenizer.encode_batch(texts), job.key["eos_token_id"], job.key["bos_token_id"]
                )
                out.write(to_token_dtype(tokens, job.dtype, job.input).tobytes())
                lengths.append(doc_lengths)
                text_bytes += sum(len(t.encode("utf-8")) for t in texts)
                report(len(texts), tokens.size, source.bytes_read - read)
                read = source.bytes_read
        if not lengths:
            first = f", the first: {malformed.examples[0]}" if malformed.examples else ""
            raise DataError(
                f"{job.input}: no documents to tokenize ({source.empty_documents} empty texts, "
                f"{malformed.count} malformed lines{first})"
            )

    atomic_write(job.outputs.tokens, write_tokens)
    all_lengths = np.concatenate(lengths)
    atomic_write_bytes(job.outputs.offsets, document_offsets_csv_gz(all_lengths))
    result = FileResult(
        documents=int(all_lengths.size),
        tokens=int(all_lengths.sum()),
        text_bytes=text_bytes,
        empty_documents=source.empty_documents,
        malformed_lines=malformed.count,
        malformed_examples=tuple(malformed.examples),
    )
    counts = {k: v for k, v in dataclasses.asdict(result).items() if k != "malformed_examples"}
    write_json(job.outputs.record, {**job.key, **counts})
    return result


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    """Consecutive groups of at most BATCH_DOCUMENTS texts, cut after about BATCH_CHARS characters."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def frame_documents(docs: list[np.ndarray], eos: int, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(all tokens, length of each framed document): each document as ``[bos] ids eos``, concatenated."""
    extra = 1 if bos is None else 2
    lengths = np.array([len(d) for d in docs], dtype=np.int64) + extra
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    is_body = np.ones(tokens.size, dtype=bool)
    is_body[ends - 1] = False
    tokens[ends - 1] = eos
    if bos is not None:
        is_body[ends - lengths] = False
        tokens[ends - lengths] = bos
    tokens[is_body] = np.concatenate(docs) if docs else []
    return tokens, lengths


def to_token_dtype(tokens: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    """`tokens` as `dtype`, or a DataError naming `path` if an id does not fit."""
    limit = int(np.iinfo(dtype).max)
    if tokens.size and int(tokens.max()) > limit:
        raise DataError(
            f"{path}: token id {int(tokens.max())} does not fit prepare.dtype={dtype.name} "
            f"(ids up to {limit}); use uint32"
        )
    return tokens.astype(dtype)


def document_offsets_csv_gz(lengths: np.ndarray) -> bytes:
    """The sidecar: gzip text with one ``start,end`` line per document, byte-identical across runs."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    text = "".join(f"{s},{e}\n" for s, e in zip(starts.tolist(), ends.tolist(), strict=True))
    return gzip.compress(text.encode("ascii"), compresslevel=6, mtime=0)
