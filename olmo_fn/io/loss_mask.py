"""Loss-mask sidecars: which tokens of a token file are trained on as targets.

``<token file>.loss_mask`` beside a token file holds one byte per token (same length as the token
array, no header): 1 where the token is a target the loss counts, 0 where it is context only (a
prompt, a user turn). The mask belongs to the *target*: position ``i`` of an instance predicts token
``i + 1``, and that prediction counts only when the mask of token ``i + 1`` is 1. A token file without
a sidecar trains on every target, as OLMo-core's files do.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from olmo_fn.errors import DataError
from olmo_fn.graph.loss import IGNORE_INDEX

LOSS_MASK_SUFFIX = ".loss_mask"


def loss_mask_path(token_file: str | os.PathLike) -> Path:
    """Where the loss mask of `token_file` lives (whether or not it exists)."""
    token_file = Path(token_file)
    return token_file.with_name(token_file.name + LOSS_MASK_SUFFIX)


def open_loss_mask(token_file: str | os.PathLike, n_tokens: int) -> np.memmap | None:
    """The memory-mapped uint8 loss mask of `token_file` (holding `n_tokens` tokens), or None when it
    has no sidecar; a DataError names a sidecar of another length."""
    path = loss_mask_path(token_file)
    if not path.exists():
        return None
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (expected a loss mask, one byte per token)")
    size = path.stat().st_size
    if size != n_tokens:
        raise DataError(
            f"{path}: {size} bytes, but {token_file} holds {n_tokens} tokens; a loss mask has one byte "
            "per token (prepare the data again)"
        )
    if size == 0:
        return None  # an empty token file is refused where it is opened
    return np.memmap(path, dtype=np.uint8, mode="r")


def open_loss_masks(paths, arrays) -> tuple[np.memmap | None, ...]:
    """`open_loss_mask` of each token file (paired with its array), or () when none has a mask."""
    masks = tuple(open_loss_mask(p, len(a)) for p, a in zip(paths, arrays, strict=True))
    return masks if any(m is not None for m in masks) else ()


def read_mask(mask: np.ndarray | None, start: int, length: int, path: Path) -> np.ndarray | None:
    """Bool (length,) of `mask` from token offset `start` (None for a file without a mask); a value
    other than 0 or 1 is a DataError naming the file and offset."""
    if mask is None:
        return None
    piece = np.asarray(mask[start : start + length])
    if piece.size and int(piece.max()) > 1:
        at = start + int(np.argmax(piece > 1))
        raise DataError(
            f"{loss_mask_path(path)}: value {int(piece.max())} at token offset {at}; a loss mask holds 0 or 1"
        )
    return piece.astype(bool)


def mask_targets(labels: np.ndarray, targets_mask: np.ndarray) -> np.ndarray:
    """`labels` as int64, with IGNORE_INDEX wherever `targets_mask` (the mask of each label's target
    token, same shape) is False."""
    return np.where(targets_mask, labels.astype(np.int64), IGNORE_INDEX)
