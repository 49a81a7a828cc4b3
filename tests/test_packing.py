"""Document packing: spans, best-fit-decreasing bins, and packed instances against naive references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from olmo_fn.graph.loss import IGNORE_INDEX
from olmo_fn.io.loader import DataConfig, open_training_data
from olmo_fn.io.packing import PackedDocuments, best_fit_decreasing, document_spans
from olmo_fn.io.token_file import write_token_file

EOS, PAD = 1, 0


def naive_spans(tokens, eos, max_len):
    docs, current, start = [], 0, 0
    for i, t in enumerate(tokens):
        current += 1
        if t == eos or i == len(tokens) - 1:
            for piece_start in range(start, start + current, max_len):
                docs.append((piece_start, min(max_len, start + current - piece_start)))
            start, current = i + 1, 0
    return docs


@given(st.lists(st.integers(0, 4), max_size=60), st.integers(1, 9))
@settings(max_examples=200, deadline=None)
def test_document_spans_match_a_loop(tokens, max_len):
    spans = document_spans(np.array(tokens, dtype=np.int64), eos=EOS, max_len=max_len)
    assert [tuple(s) for s in spans.tolist()] == naive_spans(tokens, EOS, max_len)


def naive_bfd_loads(lengths, capacity):
    loads = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, load in enumerate(loads) if load + n <= capacity]
        if fits:
            best = max(fits, key=lambda i: loads[i])
            loads[best] += n
        else:
            loads.append(n)
    return sorted(loads)


@given(st.lists(st.integers(1, 16), min_size=1, max_size=200), st.integers(16, 24))
@settings(max_examples=200, deadline=None)
def test_best_fit_decreasing_matches_a_naive_packer(lengths, capacity):
    bins = best_fit_decreasing(np.array(lengths), capacity)
    loads = np.bincount(bins, weights=lengths).astype(int)
    assert loads.max() <= capacity
    assert sorted(loads.tolist()) == naive_bfd_loads(lengths, capacity)


def packed_file(tmp_path, gen_seed=0, n_docs=40, max_doc=30):
    rng = np.random.default_rng(gen_seed)
    docs = [np.append(rng.integers(2, 50, rng.integers(1, max_doc)), EOS) for _ in range(n_docs)]
    path = write_token_file(tmp_path / "docs.npy", np.concatenate(docs).astype(np.uint16))
    return path, docs


@pytest.mark.parametrize("seq_len", [8, 16, 64])
def test_packed_instances_hold_every_document_once(tmp_path, seq_len):
    path, docs = packed_file(tmp_path)
    packed = PackedDocuments.open([path], np.dtype(np.uint16), seq_len, EOS, PAD)
    tokens, labels, doc_ids = packed.rows(np.arange(len(packed)), vocab_size=64)
    pieces = []
    for row in range(len(packed)):
        for d in np.unique(doc_ids[row]):
            at = np.flatnonzero(doc_ids[row] == d)
            assert np.all(np.diff(at) == 1), "a document is contiguous"
            piece, piece_labels = tokens[row, at], labels[row, at]
            if np.all(piece_labels == IGNORE_INDEX) and np.all(piece == PAD) and at[-1] == seq_len - 1:
                continue  # the padding tail
            assert piece_labels[:-1].tolist() == piece[1:].tolist(), "targets are the next token"
            assert piece_labels[-1] == IGNORE_INDEX, "a document's last token predicts nothing"
            pieces.append(tuple(piece.tolist()))
    expected = [tuple(p) for doc in docs for p in np.array_split(doc, np.arange(seq_len, len(doc), seq_len))]
    assert sorted(pieces) == sorted(expected)
    fill = sum(len(p) for p in expected) / (len(packed) * seq_len)
    assert fill > 0.8 or (seq_len == 64 and fill > 0.6), fill


def test_packed_batches_train_through_the_loader(tmp_path):
    path, _ = packed_file(tmp_path, n_docs=60)
    cfg = DataConfig(paths=(str(path),), eos_token_id=EOS, pad_token_id=PAD, seq_len=32, packing="documents")
    batch = open_training_data(cfg, vocab_size=64, seed=0, total_instances=8).batch(0, 4)
    assert batch.input_ids.shape == (4, 32)
    starts = torch.ones_like(batch.doc_ids, dtype=torch.bool)
    starts[:, 1:] = batch.doc_ids[:, 1:] != batch.doc_ids[:, :-1]
    assert torch.equal(batch.positions == 0, starts), "positions restart at every document"
    pad = batch.input_ids == PAD
    assert (batch.labels[pad] == IGNORE_INDEX).all()
