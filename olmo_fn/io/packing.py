"""Document packing: whole documents placed best-fit-decreasing into fixed-length instances.

Documents are the EOS-terminated runs of a token file; one longer than an instance is cut into
instance-sized pieces. Each instance holds whole documents (or pieces) and padding; every document
keeps its own id and positions, its last token predicts nothing, and padding is masked out of the
loss and attends only to itself. A file's loss mask (`olmo_fn.io.loss_mask`) is read at the same
offsets as its tokens, so it travels with every document wherever packing puts it.
"""

from __future__ import annotations

import bisect
import dataclasses
from pathlib import Path

import numpy as np

from olmo_fn.errors import DataError
from olmo_fn.graph.loss import IGNORE_INDEX
from olmo_fn.io.loss_mask import mask_targets, open_loss_masks, read_mask
from olmo_fn.io.token_file import check_token_range, open_token_file


def document_spans(tokens: np.ndarray, eos: int, max_len: int) -> np.ndarray:
    """(n, 2) int64 [start, length) of each document (EOS included), cut to at most `max_len`."""
    if not len(tokens):
        return np.empty((0, 2), np.int64)
    ends = np.flatnonzero(tokens == eos) + 1
    if len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
        ends = np.append(ends, len(tokens))  # a last document without EOS
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    lengths = ends - starts
    pieces = -(-lengths // max_len)
    piece_starts = np.repeat(starts, pieces) + max_len * (
        np.arange(pieces.sum()) - np.repeat(pieces.cumsum() - pieces, pieces)
    )
    piece_ends = np.minimum(piece_starts + max_len, np.repeat(ends, pieces))
    return np.stack([piece_starts, piece_ends - piece_starts], axis=1)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """The bin of each item when items, longest first, go into the fullest bin they still fit.

    Deterministic (ties by item order). Each step finds the smallest remaining capacity that fits
    with a binary search over the distinct remaining capacities, so the cost stays near
    O(n log capacity).
    """
    order = np.argsort(-lengths, kind="stable")
    bin_of = np.empty(len(lengths), np.int64)
    bins_with: dict[int, list[int]] = {}  # remaining capacity -> bins that have exactly that much
    capacities: list[int] = []  # sorted distinct remaining capacities that some bin has
    n_bins = 0
    for item in order:
        need = int(lengths[item])
        k = bisect.bisect_left(capacities, need)
        if k < len(capacities):
            room = capacities[k]
            b = bins_with[room].pop()
            if not bins_with[room]:
                del bins_with[room], capacities[k]
        else:
            room, b = capacity, n_bins
            n_bins += 1
        bin_of[item] = b
        left = room - need
        if left > 0:
            if left not in bins_with:
                bins_with[left] = []
                bisect.insort(capacities, left)
            bins_with[left].append(b)
    return bin_of


@dataclasses.dataclass(frozen=True)
class PackedDocuments:
    """Token files' documents packed into instances of `seq_len` tokens.

    segments: (n, 3) int64 rows ``(file, start, length)`` ordered by instance; instance i is
    ``segments[bounds[i]:bounds[i + 1]]``.
    """

    paths: tuple[Path, ...]
    arrays: tuple[np.ndarray, ...]
    seq_len: int
    eos: int
    pad: int
    segments: np.ndarray
    bounds: np.ndarray
    masks: tuple[np.ndarray | None, ...] = ()
    """Each file's loss mask, None for a file without one; () when no file has one."""

    @classmethod
    def open(cls, paths: list[Path], dtype: np.dtype, seq_len: int, eos: int, pad: int) -> PackedDocuments:
        arrays = tuple(open_token_file(p, dtype) for p in paths)
        spans = [document_spans(a, eos, seq_len) for a in arrays]
        files = np.concatenate([np.full(len(s), f, np.int64) for f, s in enumerate(spans)])
        spans_all = np.concatenate(spans)
        if not len(spans_all):
            raise DataError(f"{paths[0]}: no documents to pack")
        bins = best_fit_decreasing(spans_all[:, 1], seq_len)
        order = np.lexsort((spans_all[:, 0], files, bins))  # by bin, then file order inside a bin
        segments = np.column_stack([files, spans_all])[order]
        bounds = np.searchsorted(bins[order], np.arange(bins.max() + 2))
        return cls(tuple(paths), arrays, seq_len, eos, pad, segments, bounds, open_loss_masks(paths, arrays))

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def rows(self, indices: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, labels, doc_ids), each (len(indices), seq_len) int64, for packed instances."""
        n = len(indices)
        tokens = np.full((n, self.seq_len), self.pad, np.int64)
        labels = np.full((n, self.seq_len), IGNORE_INDEX, np.int64)
        doc_ids = np.empty((n, self.seq_len), np.int64)
        for row, index in enumerate(indices):
            at = 0
            segments = self.segments[self.bounds[index] : self.bounds[index + 1]]
            for doc, (f, start, length) in enumerate(segments):
                piece = self.arrays[f][start : start + length]
                check_token_range(piece, vocab_size, self.paths[f], start)
                tokens[row, at : at + length] = piece
                mask = read_mask(self.masks[f], start, length, self.paths[f]) if self.masks else None
                targets = piece[1:] if mask is None else mask_targets(piece[1:], mask[1:])
                labels[row, at : at + length - 1] = targets
                doc_ids[row, at : at + length] = doc
                at += length
            doc_ids[row, at:] = len(segments)  # padding: its own document
        return tokens, labels, doc_ids
