"""One input file of `prepare-data` turned into its outputs: the token array, the offsets sidecar (and,
for the fine-tuning formats, the loss-mask sidecar), and last the completion record that marks them whole.

Reading is `olmo_fn.io.text_sources`, encoding `olmo_fn.io.text_tokenizer`; this module frames the
documents with BOS/EOS, checks that ids fit the dtype, and writes every file atomically.
"""

from __future__ import annotations

import contextlib
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
from olmo_fn.io.loss_mask import loss_mask_path
from olmo_fn.io.supervised_text import (
    SupervisedSource,
    encode_segments,
    frame_loss_mask,
    segment_text_bytes,
)
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
    """The files made from one input; `record` is written last and marks the others complete.
    `loss_mask` is written only for the fine-tuning formats (and removed with the rest otherwise)."""

    tokens: Path
    offsets: Path
    record: Path
    loss_mask: Path

    @classmethod
    def for_stem(cls, output_dir: Path, stem: str) -> OutputFiles:
        tokens = output_dir / f"{stem}.npy"
        offsets, record = output_dir / f"{stem}.npy.csv.gz", output_dir / f"{stem}.npy.done.json"
        return cls(tokens, offsets, record, loss_mask_path(tokens))

    def all(self) -> tuple[Path, Path, Path, Path]:
        return (self.record, self.offsets, self.loss_mask, self.tokens)


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

    @property
    def format(self) -> str:
        """``text``, or the fine-tuning format (`olmo_fn.io.supervised_text`) that writes a loss mask."""
        return self.key.get("format", "text")


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
    tokens, offsets, mask = job.outputs.tokens, job.outputs.offsets, job.outputs.loss_mask
    expected_size = record.get("tokens", -1) * job.dtype.itemsize
    if job.format == "text":
        mask_whole = not mask.exists()
    else:
        mask_whole = mask.is_file() and mask.stat().st_size == record.get("tokens", -1)
    return offsets.is_file() and tokens.is_file() and tokens.stat().st_size == expected_size and mask_whole


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
    masked = job.format != "text"
    if masked:
        source = SupervisedSource(job.input, job.format, malformed.add)
    else:
        source = TextSource(job.input, job.key["text_field"], malformed.add)
    eos, bos = job.key["eos_token_id"], job.key["bos_token_id"]
    lengths: list[np.ndarray] = []
    text_bytes = 0

    def encode(documents: list) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        """(tokens, document lengths, loss mask or None, text bytes) of a batch of documents."""
        if not masked:
            tokens, doc_lengths = frame_documents(tokenizer.encode_batch(documents), eos, bos)
            return tokens, doc_lengths, None, sum(len(t.encode("utf-8")) for t in documents)
        ids, masks, eos_trained = encode_segments(tokenizer, documents)
        tokens, doc_lengths = frame_documents(ids, eos, bos)
        mask = frame_loss_mask(masks, eos_trained, has_bos=bos is not None)
        return tokens, doc_lengths, mask, segment_text_bytes(documents)

    def write_tokens(tmp: Path, mask_tmp: Path | None = None) -> None:
        nonlocal text_bytes
        read = 0
        mask_file = open(mask_tmp, "wb") if mask_tmp is not None else contextlib.nullcontext()
        with open(tmp, "wb") as out, mask_file as mask_out:
            for documents in _batches(source.documents()):
                tokens, doc_lengths, mask, n_bytes = encode(documents)
                out.write(to_token_dtype(tokens, job.dtype, job.input).tobytes())
                if mask_out is not None:
                    mask_out.write(mask.tobytes())
                lengths.append(doc_lengths)
                text_bytes += n_bytes
                report(len(documents), tokens.size, source.bytes_read - read)
                read = source.bytes_read
        if not lengths:
            first = f", the first: {malformed.examples[0]}" if malformed.examples else ""
            raise DataError(
                f"{job.input}: no documents to tokenize ({source.empty_documents} empty texts, "
                f"{malformed.count} malformed lines{first})"
            )

    if masked:  # the mask lands first; on any failure `prepare_file` removes every output
        mask_path = job.outputs.loss_mask
        atomic_write(job.outputs.tokens, lambda tmp: atomic_write(mask_path, lambda m: write_tokens(tmp, m)))
    else:
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
