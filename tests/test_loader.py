"""Training data: the embedded stdlib corpus, configured token files, globs, and batches by cursor."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from olmo_fn.errors import ConfigError, DataError
from olmo_fn.io import stdlib_corpus
from olmo_fn.io.byte_tokenizer import BYTE_EOS, BYTE_VOCAB, decode_bytes
from olmo_fn.io.data_order import instance_indices
from olmo_fn.io.loader import DataConfig, TrainingData, open_training_data
from olmo_fn.io.paths import expand_paths
from olmo_fn.io.token_file import write_token_file

TINY_VOCAB = 384  # the olmo2-tiny preset: byte vocab padded up


@pytest.fixture(scope="module")
def stdlib_data() -> TrainingData:
    return open_training_data(DataConfig(), TINY_VOCAB)


@pytest.fixture(scope="module")
def stdlib_sources(stdlib_data) -> dict[str, bytes]:
    """Contents of the source files the corpus says it holds (its JSON listing), read from disk."""
    listing = orjson.loads(stdlib_data.sources[0].paths[0].with_suffix(".json").read_bytes())
    root = Path(sysconfig.get_paths()["stdlib"])
    return {rel: (root / rel).read_bytes() for rel in listing["files"]}


# ---- the embedded corpus ------------------------------------------------------------------------


def test_stdlib_corpus_is_usable(stdlib_data):
    assert stdlib_data.eos_token_id == BYTE_EOS
    assert stdlib_data.vocab_size == TINY_VOCAB
    assert stdlib_data.sources[0].seq_len == DataConfig().seq_len
    assert len(stdlib_data.sources[0]) > 1000  # about 4 MB of text in 256-token instances

    batch = stdlib_data.batch(0, 4)
    assert batch.input_ids.shape == (4, DataConfig().seq_len)
    assert int(batch.input_ids.min()) >= 0
    assert int(batch.input_ids.max()) <= BYTE_EOS, "only bytes and EOS, never PAD"


def test_stdlib_corpus_documents_are_whole_source_files(stdlib_data, stdlib_sources):
    """Document k of the file is the k-th listed source file, byte for byte, and it is Python."""
    tokens = np.asarray(stdlib_data.sources[0].arrays[0])
    ends = np.flatnonzero(tokens == BYTE_EOS)
    assert len(ends) == len(stdlib_sources), "one EOS-ended document per source file"
    assert ends[-1] == len(tokens) - 1, "the last document is ended by EOS too"

    names = list(stdlib_sources)
    starts = [0, *(ends[:-1] + 1).tolist()]
    for k in (0, len(names) // 2, len(names) - 1):
        text = decode_bytes(tokens[starts[k] : ends[k]])
        assert text == stdlib_sources[names[k]].decode("utf-8")
        compile(text, names[k], "exec")  # real Python source


def test_stdlib_batches_decode_to_source_text(stdlib_data, stdlib_sources):
    """Every EOS-free stretch of a shuffled batch row is a piece of one of the source files."""
    batch = open_training_data(DataConfig(), TINY_VOCAB, seed=3).batch(1234, 8)
    sources = list(stdlib_sources.values())
    keywords = 0
    for row in batch.input_ids.tolist():
        pieces = [bytes(t for t in piece.tolist() if t != BYTE_EOS) for piece in _split_at_eos(row)]
        for data in pieces:
            assert any(data in src for src in sources)
        text = decode_bytes(row)
        assert text == b"".join(pieces).decode("utf-8", errors="replace")
        assert sum(c.isprintable() or c in "\n\t" for c in text) > 0.95 * len(text)
        keywords += sum(text.count(k) for k in ("def ", "import ", "self", "return", "class ", "#"))
    assert keywords > 0


def _split_at_eos(row: list[int]) -> list[np.ndarray]:
    a = np.array(row)
    return np.split(a, np.flatnonzero(a == BYTE_EOS))


def test_stdlib_corpus_is_cached(stdlib_data, isolated_cache, monkeypatch):
    path = stdlib_data.sources[0].paths[0]
    assert path.parent == isolated_cache == Path(os.environ["OLMO_FN_CACHE"])
    before = path.stat().st_mtime_ns

    def must_not_write(*args, **kwargs):
        raise AssertionError("the cached corpus was written again")

    monkeypatch.setattr(stdlib_corpus, "write_token_file", must_not_write)
    again = open_training_data(DataConfig(), TINY_VOCAB)
    assert again.sources[0].paths == (path,)
    assert path.stat().st_mtime_ns == before


# ---- configured token files ---------------------------------------------------------------------


def _files(directory: Path, names: list[str], length: int = 40, dtype=np.uint16) -> list[Path]:
    """File k holds k * 100 + 0 .. length-1, with EOS (id 99) every 7th token."""
    paths = []
    for k, name in enumerate(names):
        a = (k * 100 + np.arange(length)).astype(dtype)
        a[6::7] = 99
        paths.append(write_token_file(directory / name, a))
    return paths


def test_expand_paths_sorts_glob_matches(tmp_path):
    names = ["b.npy", "a.npy", "c.npy", "notes.txt"]
    for n in names:
        (tmp_path / n).write_bytes(b"\0\0")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.npy").write_bytes(b"\0\0")

    assert expand_paths((str(tmp_path / "*.npy"),)) == [tmp_path / n for n in ("a.npy", "b.npy", "c.npy")]
    assert expand_paths((str(tmp_path / "**" / "*.npy"),)) == [
        tmp_path / n for n in ("a.npy", "b.npy", "c.npy", "sub/d.npy")
    ]
    # Patterns keep their given order; plain paths pass through (checked when opened).
    assert expand_paths((str(tmp_path / "sub" / "*.npy"), str(tmp_path / "b.npy"))) == [
        tmp_path / "sub" / "d.npy",
        tmp_path / "b.npy",
    ]


def test_expand_paths_pattern_matching_nothing(tmp_path):
    pattern = str(tmp_path / "*.bin")
    with pytest.raises(DataError) as info:
        expand_paths((pattern,))
    assert pattern in str(info.value)


def test_missing_plain_path_is_named(tmp_path):
    missing = tmp_path / "missing.npy"
    with pytest.raises(DataError) as info:
        open_training_data(DataConfig(paths=(str(missing),), eos_token_id=0), TINY_VOCAB)
    assert str(missing) in str(info.value)


def test_paths_require_eos():
    with pytest.raises(ConfigError, match="eos_token_id"):
        DataConfig(paths=("x.npy",))


def test_seq_len_at_least_two():
    with pytest.raises(ConfigError, match="seq_len"):
        DataConfig(seq_len=1)


@pytest.mark.parametrize("eos", [-1, TINY_VOCAB, TINY_VOCAB + 10])
def test_eos_outside_vocab(tmp_path, eos):
    paths = _files(tmp_path, ["a.npy"])
    with pytest.raises(ConfigError, match="eos_token_id"):
        open_training_data(DataConfig(paths=(str(paths[0]),), eos_token_id=eos, seq_len=8), TINY_VOCAB)


def test_eos_at_top_of_vocab_is_fine(tmp_path):
    paths = _files(tmp_path, ["a.npy"])
    data = open_training_data(
        DataConfig(paths=(str(paths[0]),), eos_token_id=TINY_VOCAB - 1, seq_len=8), TINY_VOCAB
    )
    assert data.eos_token_id == TINY_VOCAB - 1


def test_embedded_corpus_needs_its_eos_in_the_vocab():
    with pytest.raises(ConfigError):
        open_training_data(DataConfig(), vocab_size=BYTE_EOS)
    assert open_training_data(DataConfig(), vocab_size=BYTE_VOCAB).eos_token_id == BYTE_EOS


@pytest.mark.parametrize(("dtype", "setting"), [(np.uint32, "auto"), (np.uint32, "uint32")])
def test_uint32_files_for_a_large_vocab(tmp_path, dtype, setting):
    ids = np.array([0, 70_000, 100_257, 5, 100_351, 100_257, 1, 2], dtype=dtype)
    path = write_token_file(tmp_path / "big.npy", ids)
    data = open_training_data(
        DataConfig(paths=(str(path),), eos_token_id=100_257, seq_len=8, dtype=setting), 100_352
    )
    assert data.batch(0, 1).input_ids.tolist() == [ids.astype(np.int64).tolist()]


def test_explicit_uint16_with_a_large_vocab(tmp_path):
    """data.dtype overrides the vocab-derived dtype (e.g. a small-id file for a padded vocab)."""
    ids = np.arange(16, dtype=np.uint16)
    path = write_token_file(tmp_path / "small.npy", ids)
    data = open_training_data(
        DataConfig(paths=(str(path),), eos_token_id=3, seq_len=16, dtype="uint16"), 100_352
    )
    assert data.batch(0, 1).input_ids.tolist() == [list(range(16))]


# ---- batches by cursor --------------------------------------------------------------------------


@pytest.fixture
def small_data(tmp_path):
    """(open(seed) -> TrainingData, the arrays of the three files)."""
    paths = _files(tmp_path, ["a.npy", "b.npy", "c.npy"], length=40)
    cfg = DataConfig(paths=(str(tmp_path / "*.npy"),), eos_token_id=99, seq_len=8)

    def opened(seed: int) -> TrainingData:
        return open_training_data(cfg, TINY_VOCAB, seed=seed)

    return opened, [np.fromfile(p, dtype=np.uint16) for p in paths]


def test_batch_rows_are_file_slices_in_shuffled_order(small_data):
    opened, arrays = small_data
    reference = [a[k * 8 : (k + 1) * 8] for a in arrays for k in range(len(a) // 8)]
    data = opened(4)
    assert len(data) == len(reference) == 15

    batch = data.batch(10, 12)  # straddles the first epoch boundary
    order = instance_indices(10, 12, seed=4, n_instances=15)
    expected = np.stack([reference[i] for i in order]).astype(np.int64)
    assert batch.input_ids.tolist() == expected.tolist()
    assert batch.labels[:, :-1].tolist() == expected[:, 1:].tolist()


def test_batch_is_deterministic_in_cursor_and_seed(small_data):
    opened, _ = small_data
    data = opened(1)
    a = data.batch(3, 6)
    b = opened(1).batch(3, 6)
    for x, y in zip(
        (a.input_ids, a.labels, a.doc_ids, a.positions),
        (b.input_ids, b.labels, b.doc_ids, b.positions),
        strict=True,
    ):
        assert torch.equal(x, y)
    assert not torch.equal(opened(2).batch(3, 6).input_ids, a.input_ids)
    assert not torch.equal(data.batch(4, 6).input_ids, a.input_ids)


def test_consecutive_batches_equal_one_big_batch(small_data):
    opened, _ = small_data
    data = opened(0)
    parts = [data.batch(c, 5).input_ids for c in range(0, 40, 5)]
    assert torch.equal(torch.cat(parts), data.batch(0, 40).input_ids)


def test_embedded_corpus_opens_under_a_large_vocabulary():
    """The byte corpus is uint16 whatever the model's vocabulary (every OLMo 2 preset has 100,352)."""
    data = open_training_data(DataConfig(seq_len=64), 100_352, total_instances=8)
    batch = data.batch(0, 4)
    assert batch.input_ids.shape == (4, 64) and int(batch.input_ids.max()) <= 256
    from olmo_fn.evaluate import EvalConfig, open_eval_data

    assert open_eval_data(EvalConfig(max_instances=4), DataConfig(seq_len=64), 100_352) is not None
