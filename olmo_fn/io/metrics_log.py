"""metrics.jsonl: one JSON object per line, flushed as it is written so a crash loses nothing."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import orjson

from olmo_fn.io.atomic import atomic_write_bytes


class MetricsLog:
    """Appends JSON lines to a file; usable as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "ab")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def readable_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl that parse as JSON objects, in order: a torn line (a crash
    mid-write) or anything else is skipped. A missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            record = orjson.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def truncate_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Keep only the records with ``step <= last_step`` (rewritten atomically); returns how many went.

    A resumed run continues from a checkpoint; records written after it by the interrupted run (and
    a torn last line) belong to a future that did not happen.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
    return dropped
