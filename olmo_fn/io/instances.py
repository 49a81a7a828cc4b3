"""Concat-and-chunk instances over token files, and the per-token document ids and positions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from olmo_fn.errors import DataError
from olmo_fn.graph.loss import IGNORE_INDEX
from olmo_fn.io.batch import Batch
from olmo_fn.io.loss_mask import open_loss_masks, read_mask
from olmo_fn.io.token_file import check_token_range, open_token_file


@dataclasses.dataclass(frozen=True)
class ChunkedTokens:
    """Token files cut into consecutive, non-overlapping instances of `seq_len` tokens.

    Each file is chunked on its own (an instance never spans two files); the tail of a file shorter
    than `seq_len` is dropped. Instance ``i`` is the ``i``-th chunk in file order.
    """

    paths: tuple[Path, ...]
    arrays: tuple[np.ndarray, ...]
    seq_len: int
    starts: np.ndarray
    """starts[f] = index of the first instance of file f; starts[-1] = number of instances."""
    masks: tuple[np.ndarray | None, ...] = ()
    """Each file's loss mask (`olmo_fn.io.loss_mask`), None for a file without one; () for none."""

    @classmethod
    def open(cls, paths: list[Path], dtype: np.dtype, seq_len: int) -> ChunkedTokens:
        if not paths:
            raise DataError("no token files given")
        arrays = tuple(open_token_file(p, dtype) for p in paths)
        counts = [len(a) // seq_len for a in arrays]
        if sum(counts) == 0:
            longest = max(len(a) for a in arrays)
            raise DataError(
                f"{paths[0] if len(paths) == 1 else f'{len(paths)} token files'}: the longest file holds "
                f"{longest} tokens, fewer than one instance of data.seq_len={seq_len}"
            )
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(tuple(paths), arrays, seq_len, starts, open_loss_masks(paths, arrays))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, token offset) of instance `index`."""
        f = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f, (index - int(self.starts[f])) * self.seq_len

    def tokens(self, indices: np.ndarray, vocab_size: int) -> np.ndarray:
        """(len(indices), seq_len) int64 tokens; a DataError names the file if an id is >= vocab_size."""
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, index in enumerate(indices):
            f, offset = self.locate(int(index))
            chunk = self.arrays[f][offset : offset + self.seq_len]
            check_token_range(chunk, vocab_size, self.paths[f], offset)
            out[row] = chunk
        return out

    def loss_masks(self, indices: np.ndarray) -> np.ndarray | None:
        """(len(indices), seq_len) bool: which tokens of each instance are trained on as targets (all of
        a file without a loss mask); None when no file has one."""
        if not self.masks:
            return None
        out = np.ones((len(indices), self.seq_len), dtype=bool)
        for row, index in enumerate(indices):
            f, offset = self.locate(int(index))
            piece = read_mask(self.masks[f], offset, self.seq_len, self.paths[f])
            if piece is not None:
                out[row] = piece
        return out


def document_ids(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """(batch, seq) ids counting the EOS tokens strictly before each position: an EOS belongs to the
    document it ends."""
    is_eos = (tokens == eos).to(torch.int64)
    return torch.cumsum(is_eos, dim=1) - is_eos


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) offsets of each token from the start of its document (0 at every start)."""
    seq = doc_ids.shape[1]
    idx = torch.arange(seq, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values


def make_batch(
    tokens: np.ndarray | torch.Tensor, eos: int, loss_mask: np.ndarray | torch.Tensor | None = None
) -> Batch:
    """A `Batch` from (batch, seq) tokens: labels are the next token (the last position has none).

    loss_mask: (batch, seq) bool of the tokens trained on as targets; position i keeps its label
    (token i + 1) only where ``loss_mask[:, i + 1]`` is set. None: every target.
    """
    ids = torch.as_tensor(tokens, dtype=torch.int64)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    if loss_mask is not None:
        targets = torch.as_tensor(loss_mask, dtype=torch.bool)[:, 1:]
        labels[:, :-1] = torch.where(targets, labels[:, :-1], IGNORE_INDEX)
    doc_ids = document_ids(ids, eos)
    return Batch(ids, labels, doc_ids, document_positions(doc_ids))
