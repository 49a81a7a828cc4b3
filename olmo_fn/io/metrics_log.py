"""metrics.jsonl: one JSON object per line, flushed as it is written so a crash loses nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson


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
