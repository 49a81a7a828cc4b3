"""Turning user-given file patterns into paths, and file names read from files into paths that stay
inside their directory."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from olmo_fn.errors import CheckpointError, DataError


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


def contained_path(directory: str | Path, name: object, where: str, *, follow_links: bool) -> Path:
    """``directory / name`` for a file name read from a file inside `directory` (an index, metadata),
    refusing any name that would leave `directory` — before anything is opened.

    The name must be a relative path that stays inside `directory` once ``..`` parts are resolved.
    With `follow_links`, symbolic links are resolved too, so a link pointing outside is refused
    (for directories olmo_fn wrote itself, which never hold links). Without it, links placed in the
    directory by its owner are allowed (a Hugging Face hub cache links every file into ``blobs/``).
    Raises `CheckpointError` naming `where` and the offending name.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{where}: names {name!r}, which is not a file name")
    directory = Path(directory)
    if Path(name).is_absolute() or "\\" in name:
        raise CheckpointError(f"{where}: names {name!r}, outside {directory}; refusing to open it")
    base = directory.resolve() if follow_links else Path(os.path.abspath(directory))
    candidate = directory / name
    target = candidate.resolve() if follow_links else Path(os.path.abspath(candidate))
    if target != base and base not in target.parents:
        raise CheckpointError(f"{where}: names {name!r}, outside {directory}; refusing to open it")
    return candidate
