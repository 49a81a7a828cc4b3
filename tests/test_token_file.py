"""OLMo-core token files: raw headerless uint16/uint32 arrays, read with checks, written atomically."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from olmo_fn.errors import DataError
from olmo_fn.io.token_file import open_token_file, token_dtype, write_token_file

U16 = np.dtype(np.uint16)
U32 = np.dtype(np.uint32)


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("dtype", [U16, U32])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    tokens = rng.integers(0, top, size=1000, dtype=np.int64).astype(dtype)
    tokens[:2] = [0, top]  # both extremes of the dtype survive
    path = write_token_file(tmp_path / "tokens.npy", tokens)

    assert path == tmp_path / "tokens.npy"
    assert path.stat().st_size == tokens.size * dtype.itemsize, "a raw array has no header"
    back = open_token_file(path, dtype)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, tokens)


def test_written_file_is_raw_bytes(tmp_path):
    """Exactly the array's little-endian bytes, so OLMo-core's plain np.memmap reads it."""
    tokens = np.array([1, 2, 258, 65535], dtype=np.uint16)
    path = write_token_file(tmp_path / "t.npy", tokens)
    assert path.read_bytes() == b"\x01\x00\x02\x00\x02\x01\xff\xff"
    np.testing.assert_array_equal(np.memmap(path, dtype=np.uint16, mode="r"), tokens)


@pytest.mark.parametrize("dtype", [U16, U32])
def test_reads_file_written_the_olmo_core_way(tmp_path, dtype):
    """OLMo-core writes documents ended by EOS straight into a `np.memmap(mode="w+")`, no header."""
    eos = 100_257 if dtype == U32 else 50_279
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, eos, size=n) for n in (5, 1, 17, 3)]
    ids = np.concatenate([np.append(d, eos) for d in docs])
    path = tmp_path / "part-0-00000.npy"
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=(ids.size,))
    mm[:] = ids
    mm.flush()
    del mm

    back = open_token_file(path, dtype)
    np.testing.assert_array_equal(back, ids)
    assert back[-1] == eos
    assert int((back == eos).sum()) == len(docs)


def test_open_is_read_only(tmp_path):
    path = write_token_file(tmp_path / "t.npy", np.arange(10, dtype=np.uint16))
    mm = open_token_file(path, U16)
    with pytest.raises(ValueError):
        mm[0] = 5


@pytest.mark.parametrize(
    ("vocab_size", "expected"),
    [(1, U16), (258, U16), (65535, U16), (65536, U16), (65537, U32), (100_352, U32), (2**32, U32)],
)
def test_token_dtype_boundary(vocab_size, expected):
    """uint16 holds ids 0..65535, i.e. a vocab of up to 65536 entries."""
    assert token_dtype(vocab_size) == expected
    assert np.iinfo(token_dtype(vocab_size)).max >= vocab_size - 1


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npy"
    with pytest.raises(DataError, match="not found") as info:
        open_token_file(path, U16)
    assert str(path) in str(info.value)


def test_directory(tmp_path):
    path = tmp_path / "a_dir.npy"
    path.mkdir()
    with pytest.raises(DataError) as info:
        open_token_file(path, U16)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.npy"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as info:
        open_token_file(path, U16)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("n_bytes", "dtype"), [(3, U16), (6, U32), (5, U32), (1, U16)])
def test_size_not_a_multiple_of_itemsize(tmp_path, n_bytes, dtype):
    path = tmp_path / "cut.npy"
    path.write_bytes(b"\x01" * n_bytes)
    with pytest.raises(DataError) as info:
        open_token_file(path, dtype)
    message = str(info.value)
    assert str(path) in message
    assert str(n_bytes) in message
    assert dtype.name in message


def test_whole_uint16_file_is_readable_as_uint16_but_not_uint32(tmp_path):
    """A 6-byte file is three uint16 tokens, but not a whole number of uint32 tokens."""
    path = write_token_file(tmp_path / "t.npy", np.array([1, 2, 3], dtype=np.uint16))
    assert len(open_token_file(path, U16)) == 3
    with pytest.raises(DataError):
        open_token_file(path, U32)


def test_write_leaves_no_temp_file(tmp_path):
    write_token_file(tmp_path / "a.npy", np.arange(100, dtype=np.uint16))
    write_token_file(tmp_path / "a.npy", np.arange(50, dtype=np.uint16))  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
    np.testing.assert_array_equal(open_token_file(tmp_path / "a.npy", U16), np.arange(50))


def test_write_creates_parent_directories(tmp_path):
    path = write_token_file(tmp_path / "x" / "y" / "t.npy", np.arange(4, dtype=np.uint32))
    np.testing.assert_array_equal(open_token_file(path, U32), np.arange(4))


def _boom(*args, **kwargs):
    raise OSError("simulated failure")


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, failing):
    monkeypatch.setattr(os, failing, _boom)
    target = tmp_path / "t.npy"
    with pytest.raises(OSError, match="simulated"):
        write_token_file(target, np.arange(100, dtype=np.uint16))
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    target = write_token_file(tmp_path / "t.npy", np.arange(10, dtype=np.uint16))
    monkeypatch.setattr(os, "replace", _boom)
    with pytest.raises(OSError):
        write_token_file(target, np.arange(1000, dtype=np.uint16))
    monkeypatch.undo()
    np.testing.assert_array_equal(open_token_file(target, U16), np.arange(10))
    assert _leftovers(tmp_path) == []


# Written files get the permissions np.memmap/open() would give them (0666 & ~umask), not
# mkstemp's 0600: token files on a shared cluster must stay readable to teammates.
def test_written_file_honours_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = write_token_file(tmp_path / "t.npy", np.arange(4, dtype=np.uint16))
    assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(0o666 & ~umask)


def test_write_refuses_arrays_that_are_not_token_dtypes(tmp_path):
    with pytest.raises(DataError, match=r"t\.npy: token arrays are uint16 or uint32, got int64"):
        write_token_file(tmp_path / "t.npy", np.arange(4, dtype=np.int64))
    assert not (tmp_path / "t.npy").exists()
