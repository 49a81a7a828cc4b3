"""prepare-data: raw text (.jsonl, .gz, .zst, .txt) into OLMo-core token files, checked against tokens
computed here directly from the texts (byte values, or `Tokenizer.encode` one document at a time)."""

from __future__ import annotations

import gzip
import io
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from tokenizers import Tokenizer, models

from olmo_fn.bench_prepare import PrepareBenchConfig, train_bpe_tokenizer, write_dolma_shards
from olmo_fn.errors import ConfigError, DataError
from olmo_fn.io import prepare_file
from olmo_fn.io.byte_tokenizer import BYTE_EOS, BYTE_VOCAB, decode_bytes
from olmo_fn.io.loader import DataConfig, open_training_data
from olmo_fn.io.prepare_data import PrepareDataConfig, run_prepare_data
from olmo_fn.io.prepare_file import to_token_dtype
from olmo_fn.io.prepare_progress import PrepareProgress
from olmo_fn.io.text_sources import MalformedLine, output_stems

TEXTS = ["Hello, world!\n", "naïve café — ünïcödé ✓ 🚀", "def f(x):\n    return x * 2\n", "  spaces  "]
MORE_TEXTS = ["the quick brown fox", "jumps over\nthe lazy dog", "½ ⅓ ¼"]


# ---- helpers ------------------------------------------------------------------------------------


def compress(path: Path, data: bytes) -> bytes:
    """`data` compressed as the name of `path` says."""
    if path.name.endswith(".gz"):
        return gzip.compress(data)
    if path.name.endswith((".zst", ".zstd")):
        return zstandard.ZstdCompressor().compress(data)
    return data


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    lines = b"".join(
        orjson.dumps({"id": str(i), field: t, "source": "test"}) + b"\n" for i, t in enumerate(texts)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(compress(path, lines))
    return path


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def byte_tokens(texts: list[str], eos: int = BYTE_EOS, bos: int | None = None) -> np.ndarray:
    """The expected token file contents for the byte tokenizer, built element by element."""
    out: list[int] = []
    for text in texts:
        out += ([] if bos is None else [bos]) + list(text.encode("utf-8")) + [eos]
    return np.array(out, dtype=np.int64)


def prepare(inputs, out_dir: Path, **kwargs) -> dict:
    kwargs.setdefault("workers", 1)
    cfg = PrepareDataConfig(inputs=tuple(str(p) for p in inputs), output_dir=str(out_dir), **kwargs)
    return run_prepare_data(cfg, progress=False)


def read_offsets(token_file: Path) -> list[tuple[int, int]]:
    text = gzip.decompress(Path(f"{token_file}.csv.gz").read_bytes()).decode()
    return [tuple(map(int, line.split(","))) for line in text.splitlines()]


def files_in(directory: Path) -> list[str]:
    """Every file name in `directory`, hidden temporaries included; [] if it does not exist."""
    return sorted(os.listdir(directory)) if directory.exists() else []


def contents(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in files_in(directory)}


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory) -> Path:
    """A byte-level BPE (vocab <= 400, <|endoftext|> special) trained on the test texts."""
    corpus = (TEXTS + MORE_TEXTS) * 20
    return train_bpe_tokenizer(corpus, 400, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def bpe_tokens(tokenizer: Tokenizer, texts: list[str], eos: int) -> np.ndarray:
    out: list[int] = []
    for text in texts:
        out += [*tokenizer.encode(text, add_special_tokens=False).ids, eos]
    return np.array(out, dtype=np.int64)


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": -1}, "prepare.workers=-1 must be >= 0"),
        ({"eos_token_id": -5}, "prepare.eos_token_id=-5 must be >= 0"),
        ({"bos_token_id": -1}, "prepare.bos_token_id=-1 must be >= 0"),
        ({"inputs": ()}, "prepare.inputs is empty"),
        ({"text_field": ""}, "prepare.text_field must not be empty"),
        ({"dtype": "int8"}, "prepare.dtype='int8'"),
        ({"inputs": "a.jsonl"}, "must be a tuple of paths, not a string"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    base = {"inputs": ("a.jsonl",), "output_dir": "out"}
    with pytest.raises(ConfigError, match=re.escape(message)):
        PrepareDataConfig(**{**base, **kwargs})


# ---- formats, framing, sidecar ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["docs.jsonl", "docs.jsonl.gz", "docs.jsonl.zst", "docs.jsonl.zstd", "docs.json.gz"]
)
def test_jsonl_formats_give_bytes_then_eos_per_document(tmp_path, name):
    path = write_jsonl(tmp_path / name, TEXTS)
    summary = prepare([path], tmp_path / "out")

    out = tmp_path / "out" / "docs.npy"
    assert summary["outputs"] == [str(out)]
    np.testing.assert_array_equal(np.fromfile(out, dtype=np.uint16), byte_tokens(TEXTS))
    assert summary["documents"] == len(TEXTS) and summary["tokens"] == out.stat().st_size // 2
    assert summary["dtype"] == "uint16" and summary["eos_token_id"] == BYTE_EOS


def test_txt_file_is_one_document(tmp_path):
    text = "line one\nline two — ✓\n\nlast line without newline"
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    prepare([tmp_path / "book.txt"], tmp_path / "out")
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out" / "book.npy", np.uint16), byte_tokens([text]))
    assert read_offsets(tmp_path / "out" / "book.npy") == [(0, len(text.encode()) + 1)]


def test_multi_frame_zstd_reads_every_frame(tmp_path):
    first, second = (
        b"".join(orjson.dumps({"text": t}) + b"\n" for t in part) for part in (TEXTS, MORE_TEXTS)
    )
    cctx = zstandard.ZstdCompressor()
    (tmp_path / "two.jsonl.zst").write_bytes(cctx.compress(first) + cctx.compress(second))
    prepare([tmp_path / "two.jsonl.zst"], tmp_path / "out")
    np.testing.assert_array_equal(
        np.fromfile(tmp_path / "out" / "two.npy", np.uint16), byte_tokens(TEXTS + MORE_TEXTS)
    )


def test_bos_eos_and_sidecar_offsets(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    prepare([path], tmp_path / "out", bos_token_id=257, eos_token_id=300)
    tokens = np.fromfile(tmp_path / "out" / "d.npy", np.uint16)
    np.testing.assert_array_equal(tokens, byte_tokens(TEXTS, eos=300, bos=257))

    offsets = read_offsets(tmp_path / "out" / "d.npy")
    assert len(offsets) == len(TEXTS)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(tokens)
    for (start, end), text in zip(offsets, TEXTS, strict=True):
        assert tokens[start] == 257 and tokens[end - 1] == 300
        assert bytes(tokens[start + 1 : end - 1].astype(np.uint8)) == text.encode()


def test_text_field_and_empty_texts(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["kept", "", "also kept"], field="content")
    summary = prepare([path], tmp_path / "out", text_field="content")
    assert summary["empty_documents"] == 1 and summary["documents"] == 2
    np.testing.assert_array_equal(
        np.fromfile(tmp_path / "out" / "c.npy", np.uint16), byte_tokens(["kept", "also kept"])
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=30), min_size=1, max_size=6),
    bos=st.sampled_from([None, 257]),
)
def test_any_unicode_documents_round_trip_through_the_sidecar(texts, bos):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = write_jsonl(root / "h.jsonl.zst", texts)
        prepare([path], root / "out", bos_token_id=bos)
        tokens = np.fromfile(root / "out" / "h.npy", np.uint16)
        np.testing.assert_array_equal(tokens, byte_tokens(texts, bos=bos))
        skip = 0 if bos is None else 1
        decoded = [decode_bytes(tokens[s + skip : e - 1]) for s, e in read_offsets(root / "out" / "h.npy")]
        assert decoded == texts


# ---- Hugging Face tokenizer.json ----------------------------------------------------------------


def test_bpe_tokenizer_json_matches_olmo_core_layout_and_round_trips(tmp_path, bpe_json):
    """np.fromfile(out, dtype) == concat(encode(doc) + [eos]), and each document decodes back."""
    tokenizer = Tokenizer.from_file(str(bpe_json))
    eos = tokenizer.token_to_id("<|endoftext|>")
    a = write_jsonl(tmp_path / "a.jsonl.zst", TEXTS)
    b = write_jsonl(tmp_path / "b.jsonl.gz", MORE_TEXTS)
    summary = prepare([a, b], tmp_path / "out", tokenizer=str(bpe_json))

    assert summary["eos_token_id"] == eos, "EOS found as the <|endoftext|> special token"
    assert summary["vocab_size"] == tokenizer.get_vocab_size()
    for stem, texts in (("a", TEXTS), ("b", MORE_TEXTS)):
        out = tmp_path / "out" / f"{stem}.npy"
        tokens = np.fromfile(out, dtype=np.uint16)
        np.testing.assert_array_equal(tokens, bpe_tokens(tokenizer, texts, eos))
        decoded = [tokenizer.decode(tokens[s : e - 1].tolist()) for s, e in read_offsets(out)]
        assert decoded == texts


def test_uint32_output_holds_the_same_ids(tmp_path, bpe_json):
    tokenizer = Tokenizer.from_file(str(bpe_json))
    path = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    prepare([path], tmp_path / "out", tokenizer=str(bpe_json), dtype="uint32", eos_token_id=7)
    tokens = np.fromfile(tmp_path / "out" / "a.npy", dtype=np.uint32)
    np.testing.assert_array_equal(tokens, bpe_tokens(tokenizer, TEXTS, 7))


def test_large_vocab_picks_uint32_automatically(tmp_path):
    """A sparse vocabulary whose largest id is 69,999 needs uint32, however few tokens it has."""
    tokenizer = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1, "world": 69_999}, unk_token="[UNK]"))
    tokenizer.add_special_tokens(["</s>"])
    eos = tokenizer.token_to_id("</s>")
    tok_path = tmp_path / "wide.json"
    tok_path.write_text(tokenizer.to_str())
    path = write_jsonl(tmp_path / "w.jsonl", ["world", "hello"])
    summary = prepare([path], tmp_path / "out", tokenizer=str(tok_path))
    assert summary["dtype"] == "uint32" and summary["vocab_size"] == 70_000 and summary["eos_token_id"] == eos
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out" / "w.npy", np.uint32), [69_999, eos, 0, eos])


# ---- determinism, naming, re-runs ---------------------------------------------------------------


def test_outputs_identical_across_runs_and_worker_counts(tmp_path, bpe_json):
    inputs = [
        write_jsonl(tmp_path / "in" / "a.jsonl.zst", TEXTS * 3),
        write_jsonl(tmp_path / "in" / "b.jsonl", MORE_TEXTS),
        write_jsonl(tmp_path / "in" / "c.jsonl.gz", TEXTS[::-1]),
    ]
    one = prepare(inputs, tmp_path / "w1", tokenizer=str(bpe_json), workers=1)
    two = prepare(inputs, tmp_path / "w2", tokenizer=str(bpe_json), workers=2)
    assert (one["workers"], two["workers"]) == (1, 2)
    assert contents(tmp_path / "w1") == contents(tmp_path / "w2")
    assert len(files_in(tmp_path / "w1")) == 9

    first = contents(tmp_path / "w1")
    assert first["a.npy.csv.gz"][4:8] == bytes(4), "the gzip header carries no timestamp"
    for name in files_in(tmp_path / "w1"):
        (tmp_path / "w1" / name).unlink()
    prepare(inputs, tmp_path / "w1", tokenizer=str(bpe_json), workers=1)
    assert contents(tmp_path / "w1") == first


def test_inputs_with_the_same_name_get_distinct_outputs(tmp_path):
    en = write_jsonl(tmp_path / "en" / "shard.jsonl", ["english"])
    de = write_jsonl(tmp_path / "de" / "shard.jsonl.zst", ["deutsch"])
    same_dir = write_jsonl(tmp_path / "en" / "shard.jsonl.gz", ["gzip"])
    summary = prepare([en, de, same_dir], tmp_path / "out")

    names = [Path(p).name for p in summary["outputs"]]
    assert len(set(names)) == 3
    assert names[1] == "de__shard.npy", "a parent directory tells de/ apart from en/"
    assert output_stems([en, de, same_dir]) == [n.removesuffix(".npy") for n in names], "deterministic"
    for path, text in zip(summary["outputs"], ["english", "deutsch", "gzip"], strict=True):
        np.testing.assert_array_equal(np.fromfile(path, np.uint16), byte_tokens([text]))


def test_rerun_skips_complete_outputs_and_redoes_changed_ones(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    b = write_jsonl(tmp_path / "b.jsonl.zst", MORE_TEXTS)
    out = tmp_path / "out"
    assert prepare([a, b], out)["files_written"] == 2
    stamps = {name: (out / name).stat().st_mtime_ns for name in files_in(out)}

    again = prepare([a, b], out)
    assert (again["files_written"], again["files_skipped"]) == (0, 2)
    assert {name: (out / name).stat().st_mtime_ns for name in files_in(out)} == stamps

    write_jsonl(a, [*TEXTS, "one more document"])
    changed = prepare([a, b], out)
    assert (changed["files_written"], changed["files_skipped"]) == (1, 1)
    np.testing.assert_array_equal(
        np.fromfile(out / "a.npy", np.uint16), byte_tokens([*TEXTS, "one more document"])
    )
    assert (out / "b.npy").stat().st_mtime_ns == stamps["b.npy"]

    (out / "b.npy.csv.gz").unlink()
    assert prepare([a, b], out)["files_written"] == 1, "a missing sidecar is redone"
    assert prepare([a, b], out, bos_token_id=257)["files_written"] == 2, "new settings redo everything"
    np.testing.assert_array_equal(np.fromfile(out / "b.npy", np.uint16), byte_tokens(MORE_TEXTS, bos=257))


# ---- malformed lines ----------------------------------------------------------------------------


def test_malformed_lines_are_skipped_and_reported_by_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "m.jsonl",
        [
            orjson.dumps({"text": "first"}),
            b'{"text": "unterminated',
            b"[1, 2, 3]",
            b'{"body": "no text field"}',
            b"",
            b'{"text": 42}',
            b'{"text": "bad \xff byte"}',
            orjson.dumps({"text": "last"}),
        ],
    )
    summary = prepare([path], tmp_path / "out")
    assert summary["malformed_lines"] == 5 and summary["documents"] == 2
    reported = {int(e.split(":")[1]): e for e in summary["malformed_examples"]}
    assert sorted(reported) == [2, 3, 4, 6, 7], "line numbers count from 1, blank lines are not malformed"
    assert all(e.startswith(f"{path}:") for e in reported.values())
    assert "not valid JSON" in reported[2] and "JSON object" in reported[3]
    assert "'text'" in reported[4] and "int" in reported[6] and "UTF-8" in reported[7]
    np.testing.assert_array_equal(
        np.fromfile(tmp_path / "out" / "m.npy", np.uint16), byte_tokens(["first", "last"])
    )


def test_many_malformed_lines_show_the_first_ten_then_a_count(tmp_path, capsys):
    lines = [orjson.dumps({"text": "ok"})] + [b"not json %d" % i for i in range(15)]
    path = write_lines(tmp_path / "many.jsonl", lines)
    cfg = PrepareDataConfig(inputs=(str(path),), output_dir=str(tmp_path / "out"), workers=1)
    summary = run_prepare_data(cfg, progress=True)
    assert summary["malformed_lines"] == 15
    assert [e.split(":")[1] for e in summary["malformed_examples"]] == [str(n) for n in range(2, 12)]
    err = capsys.readouterr().err
    assert f"{path}:2: not valid JSON" in err and f"{path}:11:" in err and f"{path}:12:" not in err
    assert "... and 5 more" in err and "wrote 1 files" in err


def test_strict_mode_stops_at_the_first_malformed_line(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [orjson.dumps({"text": "fine"}), b"{}", b"also bad"])
    with pytest.raises(DataError, match=rf"{path}:2: no 'text' field"):
        prepare([path], tmp_path / "out", strict=True)
    assert files_in(tmp_path / "out") == []


def test_strict_rerun_redoes_output_made_by_skipping_lines(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [orjson.dumps({"text": "fine"}), b"oops"])
    prepare([path], tmp_path / "out")
    with pytest.raises(DataError, match=rf"{path}:2:"):
        prepare([path], tmp_path / "out", strict=True)
    assert files_in(tmp_path / "out") == []


# ---- bad inputs: an error naming the file, and nothing left behind ------------------------------


def _truncated_zst(tmp: Path) -> tuple[dict, str]:
    good = write_jsonl(tmp / "cut.jsonl.zst", [f"document number {i} " * 20 for i in range(2000)])
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"inputs": [good]}, str(good)


def _truncated_gz(tmp: Path) -> tuple[dict, str]:
    good = write_jsonl(tmp / "cut.jsonl.gz", [f"document number {i} " * 20 for i in range(2000)])
    good.write_bytes(good.read_bytes()[:-20])
    return {"inputs": [good]}, str(good)


def _empty_jsonl(tmp: Path) -> tuple[dict, str]:
    (tmp / "empty.jsonl").write_bytes(b"")
    return {"inputs": [tmp / "empty.jsonl"]}, str(tmp / "empty.jsonl")


def _only_malformed(tmp: Path) -> tuple[dict, str]:
    path = write_lines(tmp / "junk.jsonl", [b"nope", b'{"text": ""}'])
    return {"inputs": [path]}, str(path)


def _empty_txt(tmp: Path) -> tuple[dict, str]:
    (tmp / "empty.txt").write_bytes(b"")
    return {"inputs": [tmp / "empty.txt"]}, str(tmp / "empty.txt")


def _invalid_utf8_txt(tmp: Path) -> tuple[dict, str]:
    (tmp / "latin1.txt").write_bytes("ok\ncafé\n".encode("latin-1"))
    return {"inputs": [tmp / "latin1.txt"]}, f"{tmp / 'latin1.txt'}:2: invalid UTF-8"


def _glob_matching_nothing(tmp: Path) -> tuple[dict, str]:
    return {"inputs": [tmp / "nowhere" / "*.jsonl.zst"]}, str(tmp / "nowhere" / "*.jsonl.zst")


def _missing_file(tmp: Path) -> tuple[dict, str]:
    return {"inputs": [tmp / "missing.jsonl"]}, str(tmp / "missing.jsonl")


def _unsupported_type(tmp: Path) -> tuple[dict, str]:
    (tmp / "table.csv").write_text("a,b\n")
    return {"inputs": [tmp / "table.csv"]}, str(tmp / "table.csv")


def _garbage_tokenizer(tmp: Path) -> tuple[dict, str]:
    (tmp / "tokenizer.json").write_text('{"version": "1.0", "model": 17}')
    return {"inputs": [write_jsonl(tmp / "a.jsonl", TEXTS)], "tokenizer": str(tmp / "tokenizer.json")}, str(
        tmp / "tokenizer.json"
    )


def _vocab_too_big_for_uint16(tmp: Path) -> tuple[dict, str]:
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)}, unk_token="w0"))
    tokenizer.add_special_tokens(["<|endoftext|>"])
    (tmp / "big.json").write_text(tokenizer.to_str())
    cfg = {"inputs": [write_jsonl(tmp / "a.jsonl", ["w1 w2"])], "tokenizer": str(tmp / "big.json")}
    return {**cfg, "dtype": "uint16"}, str(tmp / "big.json")


def _eos_too_big_for_uint16(tmp: Path) -> tuple[dict, str]:
    return {
        "inputs": [write_jsonl(tmp / "a.jsonl", TEXTS)],
        "dtype": "uint16",
        "eos_token_id": 70_000,
    }, "70000"


def _tokenizer_without_eos(tmp: Path) -> tuple[dict, str]:
    (tmp / "plain.json").write_text(Tokenizer(models.WordLevel({"a": 0, "?": 1}, unk_token="?")).to_str())
    return {
        "inputs": [write_jsonl(tmp / "a.jsonl", TEXTS)],
        "tokenizer": str(tmp / "plain.json"),
    }, "--eos-token-id"


def _bos_equal_to_eos(tmp: Path) -> tuple[dict, str]:
    return {"inputs": [write_jsonl(tmp / "a.jsonl", TEXTS)], "bos_token_id": BYTE_EOS}, "bos_token_id=256"


def _output_dir_is_a_file(tmp: Path) -> tuple[dict, str]:
    (tmp / "out").write_text("i am a file")
    return {"inputs": [write_jsonl(tmp / "a.jsonl", TEXTS)]}, str(tmp / "out")


@pytest.mark.parametrize(
    "make",
    [
        _truncated_zst,
        _truncated_gz,
        _empty_jsonl,
        _only_malformed,
        _empty_txt,
        _invalid_utf8_txt,
        _glob_matching_nothing,
        _missing_file,
        _unsupported_type,
        _garbage_tokenizer,
        _vocab_too_big_for_uint16,
        _eos_too_big_for_uint16,
        _tokenizer_without_eos,
        _bos_equal_to_eos,
        _output_dir_is_a_file,
    ],
)
def test_bad_input_names_the_file_and_leaves_no_output(tmp_path, make):
    kwargs, named = make(tmp_path)
    out = tmp_path / "out"
    before = out.read_bytes() if out.is_file() else None
    with pytest.raises((DataError, ConfigError)) as caught:
        prepare(kwargs.pop("inputs"), out, **kwargs)
    assert named in str(caught.value)
    if before is None:
        assert files_in(out) == [], "no output or temporary file left behind"
    else:
        assert out.read_bytes() == before


def test_bad_file_among_good_ones_in_parallel(tmp_path):
    """Workers finish the good inputs; the bad one is named and has no output at all."""
    good = write_jsonl(tmp_path / "good.jsonl", TEXTS)
    (_, bad) = _truncated_zst(tmp_path)
    with pytest.raises(DataError, match=str(bad)):
        prepare([good, bad], tmp_path / "out", workers=2)
    assert files_in(tmp_path / "out") == ["good.npy", "good.npy.csv.gz", "good.npy.done.json"]
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out" / "good.npy", np.uint16), byte_tokens(TEXTS))


def test_input_gone_bad_loses_its_old_outputs(tmp_path):
    path = write_jsonl(tmp_path / "cut.jsonl.zst", [f"document {i} " * 20 for i in range(2000)])
    prepare([path], tmp_path / "out")
    assert len(files_in(tmp_path / "out")) == 3
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=str(path)):
        prepare([path], tmp_path / "out")
    assert files_in(tmp_path / "out") == []


def test_failure_after_the_token_file_leaves_no_output(tmp_path, monkeypatch):
    """A crash before the completion record is written removes the token file and sidecar too."""

    def disk_full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(prepare_file, "write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare([write_jsonl(tmp_path / "a.jsonl", TEXTS)], tmp_path / "out")
    assert files_in(tmp_path / "out") == []


def test_malformed_log_keeps_only_the_first_lines():
    log = prepare_file.MalformedLog(strict=False)
    for line in range(1, 16):
        log.add(MalformedLine(Path("x.jsonl"), line, "bad"))
    assert log.count == 15 and log.examples == [f"x.jsonl:{n}: bad" for n in range(1, 11)]


def test_ids_beyond_uint16_are_refused_naming_the_file():
    ids = np.array([5, 2**16], dtype=np.int64)
    with pytest.raises(DataError, match=r"in\.jsonl: token id 65536 does not fit prepare.dtype=uint16"):
        to_token_dtype(ids, np.dtype(np.uint16), Path("in.jsonl"))
    np.testing.assert_array_equal(to_token_dtype(ids, np.dtype(np.uint32), Path("in.jsonl")), ids)


def test_terminal_progress_bar_shows_documents_and_tokens_per_second():
    display = PrepareProgress(enabled=True, total_bytes=1000, files=2)
    display.console = Console(file=io.StringIO(), force_terminal=True, width=150)
    with display:
        display.advance(10, 5000, 600)
        display.file_done()
    shown = display.console.file.getvalue()
    assert "1/2 files" in shown and "10 docs" in shown and "5.0k tokens" in shown and "/s" in shown


# ---- into training ------------------------------------------------------------------------------


def test_prepared_file_reads_back_through_the_training_loader(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl.zst", TEXTS + MORE_TEXTS)
    summary = prepare([path], tmp_path / "out")
    cfg = DataConfig(paths=(summary["outputs"][0],), eos_token_id=BYTE_EOS, seq_len=summary["tokens"])
    data = open_training_data(cfg, BYTE_VOCAB)

    batch = data.batch(0, 1)
    row = batch.input_ids[0].numpy()
    ends = np.flatnonzero(row == BYTE_EOS)
    starts = [0, *(ends[:-1] + 1)]
    assert [decode_bytes(row[s:e]) for s, e in zip(starts, ends, strict=True)] == TEXTS + MORE_TEXTS
    assert int(batch.doc_ids.max()) == len(TEXTS + MORE_TEXTS) - 1


# ---- benchmark helpers --------------------------------------------------------------------------


def test_bench_shards_are_dolma_records_prepare_reads(tmp_path):
    sources = [(f"m{i}.py", f"x = {i}\n".encode()) for i in range(5)]
    shards = write_dolma_shards(sources, tmp_path, 2)
    summary = prepare(shards, tmp_path / "out")
    assert summary["documents"] == 5
    texts = [data.decode() for _, data in sources]
    got = np.concatenate([np.fromfile(p, np.uint16) for p in summary["outputs"]])
    np.testing.assert_array_equal(got, byte_tokens(texts[0::2] + texts[1::2]))
    with pytest.raises(ConfigError, match="bench_prepare.shards=0"):
        PrepareBenchConfig(shards=0)
