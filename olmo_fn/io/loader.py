"""Training data: which token files, how they are cut, and the batch at any cursor."""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Literal

import numpy as np

from olmo_fn.errors import ConfigError, DataError
from olmo_fn.io.batch import Batch
from olmo_fn.io.byte_tokenizer import BYTE_EOS
from olmo_fn.io.data_order import instance_indices
from olmo_fn.io.instances import ChunkedTokens, make_batch
from olmo_fn.io.stdlib_corpus import stdlib_token_file
from olmo_fn.io.token_file import TOKEN_DTYPES, token_dtype


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from and how they are cut into instances."""

    paths: tuple[str, ...] = ()
    """Token files (OLMo-core format) or glob patterns. Empty: the embedded, byte-tokenized
    Python standard-library corpus."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token file dtype; auto: uint16 when model.vocab_size <= 65536, else uint32."""
    eos_token_id: int | None = None
    """End-of-document token (dolma2: 100257). Required with data.paths; the embedded corpus uses 256."""
    seq_len: int = 256
    """Tokens per instance."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be at least 2")
        if self.paths and self.eos_token_id is None:
            raise ConfigError(
                "data.eos_token_id is required with data.paths (it delimits documents; dolma2 uses 100257)"
            )


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """Chunked token files plus the end-of-document id; `batch` is a pure function of the cursor."""

    chunks: ChunkedTokens
    eos_token_id: int
    vocab_size: int

    def batch(self, cursor: int, batch_size: int, *, seed: int) -> Batch:
        """The `batch_size` instances that follow `cursor` in the shuffled order of (seed, epoch)."""
        indices = instance_indices(cursor, batch_size, seed=seed, n_instances=len(self.chunks))
        return make_batch(self.chunks.tokens(indices, self.vocab_size), self.eos_token_id)


def expand_paths(patterns: tuple[str, ...]) -> list[Path]:
    """Files named by `patterns`, globs expanded in sorted order; a pattern matching nothing is an error."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"data.paths: pattern {pattern!r} matched no files")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(pattern))
    return paths


def open_training_data(cfg: DataConfig, vocab_size: int) -> TrainingData:
    """Open and check the configured token files (or build the embedded corpus)."""
    if cfg.paths:
        paths, eos = expand_paths(cfg.paths), cfg.eos_token_id
    else:
        paths, eos = [stdlib_token_file()], BYTE_EOS
    if not 0 <= eos < vocab_size:
        raise ConfigError(
            f"data.eos_token_id={eos} is outside the model's vocabulary (vocab_size={vocab_size})"
        )
    dtype = token_dtype(vocab_size) if cfg.dtype == "auto" else TOKEN_DTYPES[cfg.dtype]
    return TrainingData(ChunkedTokens.open(paths, np.dtype(dtype), cfg.seq_len), eos, vocab_size)
