"""The embedded default data: Python standard-library sources, byte-tokenized into a cached token file.

Real text that ships with every Python, so training works offline with no download. The selection is
deterministic for a given Python installation: files are ordered by a hash of their relative path and
taken until `target_bytes` is reached.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from olmo_fn.errors import DataError
from olmo_fn.io.atomic import write_json
from olmo_fn.io.byte_tokenizer import encode_bytes
from olmo_fn.io.token_file import write_token_file

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def cache_dir() -> Path:
    """``$OLMO_FN_CACHE``, else ``$XDG_CACHE_HOME/olmo_fn``, else ``~/.cache/olmo_fn``."""
    if os.environ.get("OLMO_FN_CACHE"):
        return Path(os.environ["OLMO_FN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "olmo_fn"


TRAIN_BYTES = 4_000_000
VALIDATION_BYTES = 300_000


def _stdlib_files():
    """(relative path, contents) of the UTF-8, non-empty stdlib ``.py`` files, in hash order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = [
        p
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
    ]
    candidates.sort(key=lambda p: hashlib.blake2b(p.relative_to(root).as_posix().encode()).digest())
    for path in candidates:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if data.strip():
            yield path.relative_to(root).as_posix(), data


def select_stdlib_sources(target_bytes: int, skip_bytes: int = 0) -> list[tuple[str, bytes]]:
    """(relative path, contents) of stdlib sources, about `target_bytes` in all, after passing over
    the files that make up the first `skip_bytes` (so a held-out split never overlaps)."""
    chosen, skipped, total = [], 0, 0
    for rel, data in _stdlib_files():
        if skipped < skip_bytes:
            skipped += len(data)
            continue
        chosen.append((rel, data))
        total += len(data)
        if total >= target_bytes:
            break
    if not chosen:
        root = sysconfig.get_paths()["stdlib"]
        raise DataError(f"{root}: found no Python standard-library sources to build the default data from")
    return chosen


def stdlib_token_file(split: str = "train") -> Path:
    """Path of the byte-tokenized stdlib corpus, "train" (about 4 MB) or the held-out "validation"
    split (about 300 kB of other files), built and cached on first use.

    One document per source file, each ended by EOS. The file name carries the Python version, the
    split and a digest of the selected contents; a JSON file beside it lists the sources.
    """
    if split == "train":
        sources = select_stdlib_sources(TRAIN_BYTES)
    elif split == "validation":
        sources = select_stdlib_sources(VALIDATION_BYTES, skip_bytes=TRAIN_BYTES)
    else:
        raise ValueError(f"unknown split {split!r}")
    digest = hashlib.blake2b(digest_size=8)
    for rel, data in sources:
        digest.update(rel.encode() + b"\0" + data + b"\0")
    suffix = "" if split == "train" else f"-{split}"
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}{suffix}-{digest.hexdigest()}"
    path = cache_dir() / f"{name}.npy"
    if path.exists():
        return path
    tokens = np.concatenate([encode_bytes(data) for _, data in sources])
    write_token_file(path, tokens)
    listing = {
        "python": sys.version,
        "split": split,
        "files": [rel for rel, _ in sources],
        "tokens": int(tokens.size),
    }
    write_json(path.with_suffix(".json"), listing)
    return path
