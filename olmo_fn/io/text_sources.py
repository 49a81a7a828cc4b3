"""Raw text inputs for `prepare-data`: finding them, naming their outputs, and reading their documents.

Accepted inputs are JSON-lines files of Dolma-style records (one object per line with a text field),
plain or compressed with gzip or zstandard, and plain text files holding one document each. Files
are read as bytes and decoded line by line, so a bad line is reported by file and line number.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import orjson
import zstandard

from olmo_fn.errors import DataError
from olmo_fn.io.paths import expand_paths

COMPRESSIONS = ("", ".gz", ".zst", ".zstd")
JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
CHUNK_BYTES = 1 << 20

INPUT_SUFFIXES = tuple(
    base + comp
    for base in JSONL_SUFFIXES + TEXT_SUFFIXES
    for comp in COMPRESSIONS
    if base + comp != ".json"  # a bare .json file is usually one document, not JSON lines
)
"""Every accepted file-name ending, e.g. ``.jsonl.zst`` or ``.txt``."""


@dataclasses.dataclass(frozen=True)
class MalformedLine:
    """A line that holds no usable document; `line` counts from 1."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


# ---- finding inputs and naming outputs ----------------------------------------------------------


def input_suffix(path: Path) -> str:
    """The accepted ending of `path`'s name (longest match), or a DataError listing the valid ones."""
    name = path.name.lower()
    matches = [s for s in INPUT_SUFFIXES if name.endswith(s) and len(name) > len(s)]
    if not matches:
        raise DataError(
            f"{path}: unsupported input type; expected a name ending in {', '.join(INPUT_SUFFIXES)}"
        )
    return max(matches, key=len)


def expand_inputs(patterns: tuple[str, ...]) -> list[Path]:
    """Input files named by `patterns` (globs expanded in sorted order, duplicates dropped).

    A pattern that matches no file, a missing file, a directory or an unsupported file type is a
    DataError naming it.
    """
    paths = [
        path if glob.has_magic(pattern) else _existing_file(path)
        for pattern in patterns
        for path in expand_paths((pattern,), "prepare.inputs")
    ]
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    for path in unique.values():
        input_suffix(path)
    return list(unique.values())


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: input file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file (give files or a glob such as 'dir/*.jsonl.zst')")
    return path


def output_stems(paths: list[Path]) -> list[str]:
    """One distinct output name (without suffix) per input: the file name without its input suffix.

    Inputs that share a name are told apart by the fewest parent directories that make them
    distinct (``en__shard-0``, ``de__shard-0``); failing that, by a digest of the absolute path.
    The result depends only on the paths, so re-runs name every output the same way.
    """
    stems = [path.name[: -len(input_suffix(path))] for path in paths]
    by_stem: dict[str, list[Path]] = {}
    for path, stem in zip(paths, stems, strict=True):
        by_stem.setdefault(stem, []).append(path)
    names = [
        stem if len(by_stem[stem]) == 1 else _qualified_stem(path, by_stem[stem])
        for path, stem in zip(paths, stems, strict=True)
    ]
    repeated = Counter(names)
    return [
        name if repeated[name] == 1 else f"{name}-{_path_digest(path)}"
        for path, name in zip(paths, names, strict=True)
    ]


def _qualified_stem(path: Path, namesakes: list[Path]) -> str:
    """`path`'s stem prefixed by the fewest parent directory names that tell it from `namesakes`."""
    stem = path.name[: -len(input_suffix(path))]
    parents = [p.resolve().parent.parts[1:] for p in namesakes]  # without the root
    own = path.resolve().parent.parts[1:]
    for depth in range(1, len(own) + 1):
        if sum(p[-depth:] == own[-depth:] for p in parents) == 1:
            return "__".join([*own[-depth:], stem])
    return stem


def _path_digest(path: Path) -> str:
    return hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()


# ---- reading bytes ------------------------------------------------------------------------------


def _plain_chunks(raw: BinaryIO) -> Iterator[bytes]:
    while chunk := raw.read(CHUNK_BYTES):
        yield chunk


def _gzip_chunks(raw: BinaryIO) -> Iterator[bytes]:
    with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
        yield from _plain_chunks(stream)  # type: ignore[arg-type]


def _zstd_chunks(raw: BinaryIO) -> Iterator[bytes]:
    """Decompressed contents of every zstandard frame in `raw`; a frame cut short is an error
    (zstandard's stream reader would end quietly there)."""
    dctx = zstandard.ZstdDecompressor()
    frame, pending = dctx.decompressobj(), False
    for chunk in _plain_chunks(raw):
        while chunk:
            pending = True
            yield frame.decompress(chunk)
            if not frame.eof:
                break
            chunk, frame, pending = frame.unused_data, dctx.decompressobj(), False
    if pending:
        raise EOFError("zstandard stream ends in the middle of a frame (the file is truncated)")


_DECOMPRESSORS: dict[str, Callable[[BinaryIO], Iterator[bytes]]] = {
    "": _plain_chunks,
    ".gz": _gzip_chunks,
    ".zst": _zstd_chunks,
    ".zstd": _zstd_chunks,
}


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of a byte stream, without their newline; a long line is joined once, not repeatedly."""
    pending: list[bytes] = []
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        parts[0] = b"".join([*pending, parts[0]])
        pending = [parts.pop()]
        yield from parts
    rest = b"".join(pending)
    if rest:
        yield rest


# ---- documents ----------------------------------------------------------------------------------


class TextSource:
    """The documents of one input file, read once.

    `documents` yields each document's text; every line that holds none goes to `on_malformed`
    (which may raise, as strict mode does). `bytes_read` tells how far into the (compressed) file
    reading has got. Unreadable or damaged files raise a DataError naming the file.
    """

    def __init__(self, path: Path, text_field: str, on_malformed: Callable[[MalformedLine], None]):
        self.path, self.text_field, self.on_malformed = path, text_field, on_malformed
        suffix = input_suffix(path)
        self.compression = next(c for c in COMPRESSIONS[::-1] if suffix.endswith(c))
        self.is_jsonl = suffix[: len(suffix) - len(self.compression)] in JSONL_SUFFIXES
        self.empty_documents = 0
        self._raw: BinaryIO | None = None
        self._done = 0

    @property
    def bytes_read(self) -> int:
        return self._raw.tell() if self._raw is not None and not self._raw.closed else self._done

    def documents(self) -> Iterator[str]:
        try:
            with open(self.path, "rb") as raw:
                self._raw = raw
                chunks = _DECOMPRESSORS[self.compression](raw)
                texts = self._jsonl_texts(chunks) if self.is_jsonl else self._file_text(chunks)
                for text in texts:
                    if text:
                        yield text
                    else:
                        self.empty_documents += 1
                self._done = raw.tell()
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise DataError(f"{self.path}: cannot read ({type(exc).__name__}: {exc})") from None

    def _jsonl_texts(self, chunks: Iterator[bytes]) -> Iterator[str]:
        for number, line in enumerate(_split_lines(chunks), start=1):
            if not line.strip():
                continue
            text, reason = self._record_text(line)
            if reason is None:
                yield text
            else:
                self.on_malformed(MalformedLine(self.path, number, reason))

    def _record_text(self, line: bytes) -> tuple[str, str | None]:
        """(text, None) for a usable record, else ("", why not)."""
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return "", _json_failure(line, exc)
        if not isinstance(record, dict):
            return "", f"expected a JSON object, got {type(record).__name__}"
        if self.text_field not in record:
            return "", f"no {self.text_field!r} field"
        text = record[self.text_field]
        if not isinstance(text, str):
            return "", f"{self.text_field!r} is {type(text).__name__}, not a string"
        return text, None

    def _file_text(self, chunks: Iterator[bytes]) -> Iterator[str]:
        data = b"".join(chunks)
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            self.on_malformed(MalformedLine(self.path, line, f"invalid UTF-8 (file byte {exc.start})"))


def _json_failure(line: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"invalid UTF-8 (line byte {bad.start})"
    return f"not valid JSON ({exc.msg} at column {exc.colno})"
