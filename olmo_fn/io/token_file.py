"""OLMo-core token files: raw, headerless arrays of token ids (uint16 or uint32), documents ended by EOS.

Despite the customary ``.npy`` suffix there is no numpy header; the dtype is not stored in the file,
so it comes from the configuration or from the vocabulary size (uint16 when every id fits).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from olmo_fn.errors import DataError
from olmo_fn.io.atomic import atomic_write

TOKEN_DTYPES = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest token-file dtype that holds ids ``0 .. vocab_size - 1``."""
    return TOKEN_DTYPES["uint16"] if vocab_size <= 2**16 else TOKEN_DTYPES["uint32"]


def open_token_file(path: str | os.PathLike, dtype: np.dtype) -> np.memmap:
    """Memory-map a token file read-only, after checking that it exists, is non-empty and whole."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: token file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (expected a raw token array)")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: token file is empty")
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: size {size} bytes is not a multiple of {dtype.itemsize} ({dtype.name}); "
            "the file is truncated or the dtype is wrong (set data.dtype)"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def write_token_file(path: str | os.PathLike, tokens: np.ndarray) -> Path:
    """Write `tokens` (uint16 or uint32) as a raw token file, atomically: a crash never leaves a partial
    file at `path`. The file gets the usual permissions (0666 less the umask)."""
    path = Path(path)
    if tokens.dtype not in TOKEN_DTYPES.values():
        raise DataError(f"{path}: token arrays are uint16 or uint32, got {tokens.dtype}")
    data = np.ascontiguousarray(tokens).tobytes()
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


RANGE_SCAN_BUDGET = 4 << 30
"""Token files up to this many bytes in all are scanned whole for ids outside the vocabulary before a
run starts (a few seconds at most); larger data is checked batch by batch as it is read."""


def scan_token_range(paths: list[Path], dtype: np.dtype, vocab_size: int) -> bool:
    """Check every id of `paths` against `vocab_size` (DataError naming file and offset), when ids of
    `dtype` can reach it and the files fit `RANGE_SCAN_BUDGET`; returns whether they were scanned."""
    if np.iinfo(dtype).max < vocab_size:
        return True  # no id of this dtype can be out of range
    arrays = [open_token_file(path, dtype) for path in paths]
    if sum(a.nbytes for a in arrays) > RANGE_SCAN_BUDGET:
        return False
    chunk = (64 << 20) // dtype.itemsize
    for path, tokens in zip(paths, arrays, strict=True):
        for start in range(0, len(tokens), chunk):
            check_token_range(np.asarray(tokens[start : start + chunk]), vocab_size, Path(path), start)
    return True


def check_token_range(tokens: np.ndarray, vocab_size: int, path: Path, offset: int) -> None:
    """DataError naming the file and token offset if any id in `tokens` is >= `vocab_size`."""
    biggest = int(tokens.max()) if len(tokens) else 0
    if biggest >= vocab_size:
        at = offset + int(np.argmax(tokens >= vocab_size))
        raise DataError(
            f"{path}: token id {biggest} at token offset {at} is >= the model's vocab_size={vocab_size} "
            "(wrong dtype, wrong tokenizer, or model.vocab_size too small)"
        )
