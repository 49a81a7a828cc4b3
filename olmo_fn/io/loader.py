"""Training data: which token files, how they are cut or packed and mixed, and the batch at any cursor.

`TrainingData.batch(cursor, global_batch, rank=, world=)` is a pure function of its arguments: the
global batch is instances ``cursor .. cursor + global_batch - 1`` of the mixture's order, and each
data-parallel rank takes its contiguous share, so every instance of an epoch is used exactly once
across ranks and a resumed run continues from the cursor alone. `Prefetcher` builds the next
batches on a background thread.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from olmo_fn.errors import ConfigError
from olmo_fn.io.batch import Batch
from olmo_fn.io.byte_tokenizer import BYTE_EOS, BYTE_PAD
from olmo_fn.io.instances import ChunkedTokens, document_positions, make_batch
from olmo_fn.io.mixture import MixturePlan, SourceConfig
from olmo_fn.io.packing import PackedDocuments
from olmo_fn.io.paths import expand_paths
from olmo_fn.io.stdlib_corpus import stdlib_token_file
from olmo_fn.io.token_file import TOKEN_DTYPES, scan_token_range, token_dtype


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from, how they are cut into instances, and how sources mix."""

    paths: tuple[str, ...] = ()
    """Token files (OLMo-core format) or glob patterns. Empty (and no sources): the embedded,
    byte-tokenized Python standard-library corpus. A ``<file>.loss_mask`` beside a token file (from
    prepare-data --format chat|prompt-completion) limits the loss to the targets it marks."""
    sources: tuple[SourceConfig, ...] = ()
    """A mixture of named sources, each with paths, a ratio (or ratio schedule) and a maximum
    repetition. Written in a config file (--config); replaces paths."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token file dtype; auto: uint16 when model.vocab_size <= 65536, else uint32."""
    eos_token_id: int | None = None
    """End-of-document token (dolma2: 100257). Required with paths/sources; the embedded corpus uses 256."""
    pad_token_id: int | None = None
    """Padding token for document packing (dolma2: 100277); the embedded corpus uses 257."""
    seq_len: int = 256
    """Tokens per instance."""
    packing: Literal["concat_chunk", "documents"] = "concat_chunk"
    """concat_chunk: each file cut into consecutive seq_len pieces; documents: whole documents packed
    best-fit-decreasing into instances, padding masked out of the loss."""
    tokenizer: str = "bytes"
    """The tokenizer that made the token files: "bytes" (built-in) or a tokenizer.json path. Used for
    bits per byte in evaluation, for generation and for conversion; it does not change training."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be at least 2")
        if self.paths and self.sources:
            raise ConfigError("data.paths and data.sources are exclusive: put every file in a source")
        if (self.paths or self.sources) and self.eos_token_id is None:
            raise ConfigError(
                "data.eos_token_id is required with data.paths (it delimits documents; dolma2 uses 100257)"
            )
        if (self.paths or self.sources) and self.packing == "documents" and self.pad_token_id is None:
            raise ConfigError(
                "data.pad_token_id is required with data.packing=documents (dolma2 uses 100277)"
            )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names must be unique, got {names}")


Instances = ChunkedTokens | PackedDocuments


class TrainingData:
    """Opened sources plus the mixture plan; `batch` is a pure function of the cursor."""

    def __init__(
        self,
        names: tuple[str, ...],
        sources: tuple[Instances, ...],
        plan: MixturePlan,
        eos: int,
        vocab_size: int,
    ):
        self.names, self.sources, self.plan = names, sources, plan
        self.eos_token_id, self.vocab_size = eos, vocab_size

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def batch(self, cursor: int, global_batch: int, *, rank: int = 0, world: int = 1) -> Batch:
        """This rank's rows of the global batch of `global_batch` instances that starts at `cursor`."""
        if global_batch % world:
            raise ConfigError(
                f"global_batch_size={global_batch} is not divisible by {world} data-parallel ranks"
            )
        per_rank = global_batch // world
        sources, indices = self.plan.instances(cursor + rank * per_rank, per_rank)
        parts = [
            (np.flatnonzero(sources == s), self._rows(s, indices[sources == s])) for s in np.unique(sources)
        ]
        return _interleave(parts, per_rank)

    def source_of(self, cursor: int, count: int) -> np.ndarray:
        """The source index of each of `count` instances from `cursor` (for measuring the mixture)."""
        return self.plan.draws(cursor, count)[0]

    def _rows(self, source: int, indices: np.ndarray) -> Batch:
        instances = self.sources[source]
        if isinstance(instances, PackedDocuments):
            tokens, labels, doc_ids = (torch.from_numpy(a) for a in instances.rows(indices, self.vocab_size))
            return Batch(tokens, labels, doc_ids, document_positions(doc_ids))
        tokens = instances.tokens(indices, self.vocab_size)
        return make_batch(tokens, self.eos_token_id, instances.loss_masks(indices))


def _interleave(parts: list[tuple[np.ndarray, Batch]], n: int) -> Batch:
    """One batch of `n` rows from per-source batches and the row positions they go to."""
    if len(parts) == 1:
        return parts[0][1]
    fields = []
    for field in dataclasses.fields(Batch):
        first = getattr(parts[0][1], field.name)
        out = torch.empty((n, *first.shape[1:]), dtype=first.dtype)
        for rows, batch in parts:
            out[torch.from_numpy(rows)] = getattr(batch, field.name)
        fields.append(out)
    return Batch(*fields)


def token_file_dtype(cfg: DataConfig, vocab_size: int) -> np.dtype:
    """The dtype of the token files `cfg` names: data.dtype, or by the vocabulary size; the embedded
    corpus is always uint16 (bytes), whatever the model's vocabulary."""
    if not (cfg.paths or cfg.sources):
        return TOKEN_DTYPES["uint16"]
    return np.dtype(token_dtype(vocab_size) if cfg.dtype == "auto" else TOKEN_DTYPES[cfg.dtype])


def open_training_data(
    cfg: DataConfig, vocab_size: int, *, seed: int = 0, total_instances: int = 0
) -> TrainingData:
    """Open and check the configured sources (or build the embedded corpus) and plan their mixture
    over a run of `total_instances` instances."""
    embedded = not (cfg.paths or cfg.sources)
    eos = BYTE_EOS if embedded else cfg.eos_token_id
    pad = BYTE_PAD if embedded else cfg.pad_token_id
    for name, value in (("eos_token_id", eos), ("pad_token_id", pad)):
        if value is not None and not 0 <= value < vocab_size:
            raise ConfigError(
                f"data.{name}={value} is outside the model's vocabulary (vocab_size={vocab_size})"
            )
    if cfg.sources:
        sources = cfg.sources
    else:
        paths = cfg.paths or (str(stdlib_token_file()),)
        sources = (SourceConfig("train", paths, max_repetition=math.inf),)
    dtype = token_file_dtype(cfg, vocab_size)
    opened = []
    for source in sources:
        where = "data.paths" if not cfg.sources else f"data.sources[{source.name!r}].paths"
        paths = expand_paths(source.paths, where)
        if not embedded:
            scan_token_range(paths, dtype, vocab_size)
        if cfg.packing == "documents":
            opened.append(PackedDocuments.open(paths, dtype, cfg.seq_len, eos, pad))
        else:
            opened.append(ChunkedTokens.open(paths, dtype, cfg.seq_len))
    plan = MixturePlan(tuple(len(s) for s in opened), tuple(sources), total_instances, seed)
    return TrainingData(tuple(s.name for s in sources), tuple(opened), plan, eos, vocab_size)


class Prefetcher:
    """Builds the batches of the coming steps on a background thread, so a step never waits on reading.

    `produce(cursor)` must be a pure function of the cursor; batches are made for cursors
    ``start, start + stride, ...`` and handed out in that order. Use as a context manager.
    """

    def __init__(
        self, produce: Callable[[int], Batch], start: int, stride: int, *, depth: int = 2, pin: bool = False
    ):
        self._produce, self._pin = produce, pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.wait_s = 0.0
        """Time `next` spent waiting for a batch that was not ready yet (summed)."""
        self._thread = threading.Thread(target=self._run, args=(start, stride), daemon=True, name="prefetch")
        self._thread.start()

    def _run(self, cursor: int, stride: int) -> None:
        while not self._stop.is_set():
            try:
                item = (cursor, self._produce(cursor))
                if self._pin:
                    item = (cursor, Batch(*(t.pin_memory() for t in dataclasses.astuple(item[1]))))
            except BaseException as exc:  # handed to the consumer, raised there
                item = (cursor, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            cursor += stride

    def next(self) -> tuple[int, Batch]:
        """(cursor, batch) of the next step; re-raises an error raised while producing it."""
        start = time.perf_counter()
        cursor, item = self._queue.get()
        self.wait_s += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        return cursor, item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
