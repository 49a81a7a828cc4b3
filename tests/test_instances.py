"""Instances cut from token files, and per-token document ids/positions, against naive loops."""

from __future__ import annotations

import tempfile
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from olmo_fn.errors import DataError
from olmo_fn.graph.loss import IGNORE_INDEX
from olmo_fn.io.instances import ChunkedTokens, document_ids, document_positions, make_batch
from olmo_fn.io.token_file import write_token_file

U16 = np.dtype(np.uint16)


# ---- naive references -------------------------------------------------------------------------


def naive_document_ids(row, eos):
    """Number of EOS tokens strictly before each position."""
    out, doc = [], 0
    for t in row:
        out.append(doc)
        if t == eos:
            doc += 1
    return out


def naive_positions_from_tokens(row, eos):
    """Offset from the document start; the token after an EOS starts a new document."""
    out, pos = [], 0
    for t in row:
        out.append(pos)
        pos = 0 if t == eos else pos + 1
    return out


def naive_positions_from_ids(ids):
    out = []
    for i, d in enumerate(ids):
        out.append(0 if i == 0 or d != ids[i - 1] else out[-1] + 1)
    return out


def naive_instances(arrays, seq_len):
    """(file number, offset, tokens) of every instance, file by file, dropping each file's tail."""
    out = []
    for f, a in enumerate(arrays):
        for k in range(len(a) // seq_len):
            out.append((f, k * seq_len, np.asarray(a[k * seq_len : (k + 1) * seq_len])))
    return out


# ---- document ids and positions -----------------------------------------------------------------

EOS = 3
EDGE_ROWS = [
    [EOS, 1, 2, EOS, 0, 1],  # starts with EOS
    [1, 2, EOS, 0, 1, EOS],  # ends with EOS
    [1, EOS, EOS, EOS, 2, 0],  # consecutive EOS
    [EOS, EOS, EOS, EOS, EOS, EOS],  # only EOS
    [0, 1, 2, 0, 1, 2],  # no EOS
]


def _check_ids_and_positions(tokens: np.ndarray, eos: int) -> None:
    t = torch.as_tensor(tokens, dtype=torch.int64)
    ids = document_ids(t, eos)
    pos = document_positions(ids)
    assert ids.shape == pos.shape == t.shape
    for b, row in enumerate(tokens.tolist()):
        assert ids[b].tolist() == naive_document_ids(row, eos)
        assert pos[b].tolist() == naive_positions_from_tokens(row, eos)


def test_edge_rows():
    _check_ids_and_positions(np.array(EDGE_ROWS), EOS)


def test_edge_rows_concrete():
    """One case spelled out, so the convention (EOS belongs to the document it ends) is visible."""
    t = torch.tensor([[EOS, 1, EOS, EOS, 2]])
    ids = document_ids(t, EOS)
    assert ids.tolist() == [[0, 1, 1, 2, 3]]
    assert document_positions(ids).tolist() == [[0, 0, 1, 0, 0]]


@settings(max_examples=50, deadline=None)
@given(
    eos=st.integers(0, 4),
    tokens=hnp.arrays(
        np.int64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.integers(0, 4),  # dense in EOS: runs of consecutive EOS are common
    ),
)
def test_ids_and_positions_match_naive(eos, tokens):
    _check_ids_and_positions(tokens, eos)


@settings(max_examples=50, deadline=None)
@given(
    steps=hnp.arrays(
        np.int64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=30),
        elements=st.integers(0, 3),
    )
)
def test_positions_restart_wherever_the_id_changes(steps):
    """document_positions only needs non-decreasing ids; gaps in the numbering are fine."""
    ids = torch.as_tensor(np.cumsum(steps, axis=1))
    pos = document_positions(ids)
    for b in range(ids.shape[0]):
        assert pos[b].tolist() == naive_positions_from_ids(ids[b].tolist())


# ---- make_batch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("as_numpy", [True, False])
def test_make_batch(as_numpy):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, size=(3, 17)).astype(np.uint16)
    tokens[0, 0] = tokens[1, -1] = 5
    batch = make_batch(tokens if as_numpy else torch.as_tensor(tokens.astype(np.int64)), eos=5)

    for field in (batch.input_ids, batch.labels, batch.doc_ids, batch.positions):
        assert field.shape == (3, 17)
        assert field.dtype == torch.int64
    assert batch.input_ids.tolist() == tokens.tolist()
    for b, row in enumerate(tokens.tolist()):
        assert batch.labels[b].tolist() == [*row[1:], IGNORE_INDEX]
        assert batch.doc_ids[b].tolist() == naive_document_ids(row, 5)
        assert batch.positions[b].tolist() == naive_positions_from_tokens(row, 5)
    assert batch.n_tokens == 3 * 17


def test_ignore_index_is_what_cross_entropy_ignores():
    assert torch.nn.functional.cross_entropy(torch.zeros(1, 4), torch.tensor([0])) > 0
    loss = torch.nn.functional.cross_entropy(
        torch.randn(2, 4), torch.tensor([1, IGNORE_INDEX]), reduction="none"
    )
    assert loss[1] == 0


# ---- ChunkedTokens ------------------------------------------------------------------------------


def _write_files(directory: Path, lengths: list[int]) -> tuple[list[Path], list[np.ndarray]]:
    """File f holds f * 1000 + 0, 1, 2, ..., so every token tells which file and offset it came from."""
    paths, arrays = [], []
    for f, n in enumerate(lengths):
        a = (f * 1000 + np.arange(n)).astype(np.uint16)
        paths.append(write_token_file(directory / f"part-{f}.npy", a))
        arrays.append(a)
    return paths, arrays


def _check_chunks(directory: Path, lengths: list[int], seq_len: int) -> None:
    paths, arrays = _write_files(directory, lengths)
    chunks = ChunkedTokens.open(paths, U16, seq_len)
    expected = naive_instances(arrays, seq_len)

    assert len(chunks) == sum(n // seq_len for n in lengths) == len(expected)
    for i, (f, offset, _) in enumerate(expected):
        assert chunks.locate(i) == (f, offset)

    got = chunks.tokens(np.arange(len(chunks)), vocab_size=len(lengths) * 1000)
    assert got.dtype == np.int64
    assert got.shape == (len(expected), seq_len)
    for row, (f, _, want) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(row, want)
        assert set((row // 1000).tolist()) == {f}, "an instance never spans two files"

    order = np.random.default_rng(0).permutation(len(chunks))
    shuffled = chunks.tokens(order, vocab_size=len(lengths) * 1000)
    for row, i in zip(shuffled, order, strict=True):
        np.testing.assert_array_equal(row, expected[i][2])


def test_chunks_over_files_of_different_lengths(tmp_path):
    # 23 -> 5 instances (tail of 3 dropped), 3 -> none (shorter than seq_len), 16 -> 4, 9 -> 2.
    _check_chunks(tmp_path, [23, 3, 16, 9], seq_len=4)


def test_chunks_single_file_exact_multiple(tmp_path):
    _check_chunks(tmp_path, [12], seq_len=4)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=5),
    seq_len=st.integers(1, 12),
)
def test_chunks_property(lengths, seq_len):
    assume(max(lengths) >= seq_len)  # otherwise: test_no_full_instance_*
    with tempfile.TemporaryDirectory() as d:
        _check_chunks(Path(d), lengths, seq_len)


def test_out_of_vocab_token_names_file_and_offset(tmp_path):
    paths, arrays = _write_files(tmp_path, [8, 16])
    bad = arrays[1].copy()
    bad[13] = 4000  # file 1, instance covering offsets 12..15
    write_token_file(paths[1], bad)
    chunks = ChunkedTokens.open(paths, U16, seq_len=4)

    # Instances away from the bad token read fine; instance 2 + 3 = 5 holds it.
    chunks.tokens(np.array([0, 1, 2, 3, 4]), vocab_size=2000)
    with pytest.raises(DataError) as info:
        chunks.tokens(np.array([1, 5]), vocab_size=2000)
    message = str(info.value)
    assert str(paths[1]) in message
    assert "offset 13" in message
    assert "4000" in message
    assert "2000" in message


def test_token_equal_to_vocab_size_is_out_of_range(tmp_path):
    path = write_token_file(tmp_path / "t.npy", np.array([0, 1, 2, 10], dtype=np.uint16))
    chunks = ChunkedTokens.open([path], U16, seq_len=4)
    np.testing.assert_array_equal(chunks.tokens(np.array([0]), vocab_size=11), [[0, 1, 2, 10]])
    with pytest.raises(DataError, match="offset 3"):
        chunks.tokens(np.array([0]), vocab_size=10)


def test_no_full_instance_single_file(tmp_path):
    paths, _ = _write_files(tmp_path, [7])
    with pytest.raises(DataError) as info:
        ChunkedTokens.open(paths, U16, seq_len=8)
    assert str(paths[0]) in str(info.value)
    assert "seq_len=8" in str(info.value)


def test_no_full_instance_several_files(tmp_path):
    paths, _ = _write_files(tmp_path, [7, 3, 5])
    with pytest.raises(DataError, match="seq_len=8"):
        ChunkedTokens.open(paths, U16, seq_len=8)


def test_no_files():
    with pytest.raises(DataError):
        ChunkedTokens.open([], U16, seq_len=8)


def test_bad_file_among_good_ones_is_named(tmp_path):
    paths, _ = _write_files(tmp_path, [8, 8])
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError) as info:
        ChunkedTokens.open([paths[0], broken, paths[1]], U16, seq_len=4)
    assert str(broken) in str(info.value)
