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


def select_stdlib_sources(target_bytes: int) -> list[tuple[str, bytes]]:
    """(relative path, contents) of UTF-8 stdlib ``.py`` files, about `target_bytes` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = [
        p
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
    ]
    candidates.sort(key=lambda p: hashlib.blake2b(p.relative_to(root).as_posix().encode()).digest())
    chosen, total = [], 0
    for path in candidates:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not data.strip():
            continue
        chosen.append((path.relative_to(root).as_posix(), data))
        total += len(data)
        if total >= target_bytes:
            break
    if not chosen:
        raise DataError(f"{root}: found no Python standard-library sources to build the default data from")
    return chosen


def stdlib_token_file(target_bytes: int = 4_000_000) -> Path:
    """Path of the byte-tokenized stdlib corpus (built and cached on first use).

    One document per source file, each ended by EOS. The file name carries the Python version and a
    digest of the selected contents; a JSON file beside it lists the sources.
    """
    sources = select_stdlib_sources(target_bytes)
    digest = hashlib.blake2b(digest_size=8)
    for rel, data in sources:
        digest.update(rel.encode() + b"\0" + data + b"\0")
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{digest.hexdigest()}"
    path = cache_dir() / f"{name}.npy"
    if path.exists():
        return path
    tokens = np.concatenate([encode_bytes(data) for _, data in sources])
    write_token_file(path, tokens)
    listing = {"python": sys.version, "files": [rel for rel, _ in sources], "tokens": int(tokens.size)}
    write_json(path.with_suffix(".json"), listing)
    return path
