"""Turning user-given file patterns into paths."""

from __future__ import annotations

import glob
from pathlib import Path

from olmo_fn.errors import DataError


def expand_paths(patterns: tuple[str, ...], where: str = "data.paths") -> list[Path]:
    """Files named by `patterns`, globs expanded in sorted order (directories skipped), plain paths
    kept as given (checked when opened). A pattern matching no file is a DataError naming `where`."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise DataError(f"{where}: pattern {pattern!r} matched no files")
            paths.extend(matches)
        else:
            paths.append(Path(pattern))
    return paths
