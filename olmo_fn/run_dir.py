"""A run directory's life: decide, before writing anything, whether `train` starts it, starts it afresh,
resumes it or must refuse; then keep what the run needs to be used later (its config, its tokenizer).

A run directory holds ``config.json``, ``metrics.jsonl``, ``checkpoints/step{N}/`` and, when the
data came from a tokenizer.json, its own copy ``tokenizer.json``. The rules (README: "Checkpoints and
resuming"):

- a complete checkpoint and config.json: resume from the newest checkpoint;
- checkpoints without config.json: refuse (the run's config was lost; starting over would overwrite
  its history);
- no checkpoint and no completed step (an attempt that failed before its first update): start afresh;
- completed steps but no checkpoint: refuse (starting over would silently repeat those steps);
- a ``checkpoints/step{N}`` that is a symbolic link: refuse (olmo_fn never writes one, and pruning
  would have to delete through it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import orjson

from olmo_fn.errors import CheckpointError, ConfigError
from olmo_fn.io.atomic import atomic_write_bytes
from olmo_fn.state.checkpoint import latest_checkpoint, linked_checkpoints, read_manifest

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TOKENIZER = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class RunStart:
    """How a train command starts in its run directory."""

    kind: Literal["new", "afresh", "resume"]
    checkpoint: Path | None = None
    manifest: dict[str, Any] | None = None


def check_run_dir_writable(run_dir: Path) -> None:
    """A ConfigError naming `run_dir` when it is a file, or when it (or the directory it would be
    created in) cannot be written: read-only file system, no permission."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: exists and is not a directory")
    existing = run_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--run-dir {run_dir}: cannot write into {existing} ({_write_problem(existing)})")


def _write_problem(path: Path) -> str:
    try:
        return "read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "permission denied"
    except OSError:
        return "not writable"


def completed_steps(metrics: Path) -> int:
    """How many step records `metrics` holds (a torn or malformed line is not one)."""
    if not metrics.is_file():
        return 0
    count = 0
    for line in metrics.read_bytes().splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        count += isinstance(record, dict) and isinstance(record.get("step"), int)
    return count


def inspect_run_dir(run_dir: Path, *, resume_required: bool) -> RunStart:
    """How `train` may start in `run_dir` (module docstring); writes nothing, raises on a refusal."""
    if not run_dir.exists():
        if resume_required:
            raise CheckpointError(f"{run_dir}: no run to resume here (no such directory); --resume needs one")
        return RunStart("new")
    links = linked_checkpoints(run_dir)
    if links:
        shown = ", ".join(f"{p.name} -> {os.readlink(p)}" for p in links)
        raise CheckpointError(
            f"{run_dir}: checkpoints/{shown} is a symbolic link; olmo_fn resumes only from checkpoints "
            "it wrote inside the run directory and never deletes through a link. Copy the checkpoint in "
            "(cp -r --dereference) or remove the link"
        )
    checkpoint = latest_checkpoint(run_dir)
    has_config = (run_dir / CONFIG).is_file()
    steps = completed_steps(run_dir / METRICS)
    if checkpoint is not None:
        if not has_config:
            raise CheckpointError(
                f"{run_dir}: holds checkpoints (newest {checkpoint.name}) but no {CONFIG}; refusing to start "
                f"over on top of them. Restore it with `python -m olmo_fn.run checkpoint info {run_dir} "
                f"--print-config > {run_dir / CONFIG}`, or choose another --run-dir"
            )
        return RunStart("resume", checkpoint, read_manifest(checkpoint))
    if steps:
        raise CheckpointError(
            f"{run_dir}: holds {steps} completed step(s) in {METRICS} but no complete checkpoint to resume "
            "from; starting over would repeat them. Remove the directory or choose another --run-dir"
        )
    if resume_required:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume here; --resume needs one")
    return RunStart("afresh" if has_config else "new")


def keep_tokenizer(run_dir: Path, tokenizer: str) -> Path | None:
    """Copy the run's tokenizer.json into the run directory (if it is not there already, byte for byte),
    so generate, convert and export find it from anywhere; returns the copy (None for "bytes")."""
    if tokenizer == "bytes":
        return None
    copy = run_dir / TOKENIZER
    source = Path(tokenizer)
    if copy.exists() and source.resolve() == copy.resolve():
        return copy
    data = source.read_bytes()
    if not copy.is_file() or copy.read_bytes() != data:
        atomic_write_bytes(copy, data)
    return copy


def run_tokenizer(checkpoint: Path, configured: str) -> str:
    """The tokenizer of a checkpoint's run: the run's own copy when the checkpoint sits in a run
    directory that has one, else the configured name ("bytes" or a path)."""
    if configured == "bytes":
        return configured
    if checkpoint.parent.name == "checkpoints":
        copy = checkpoint.parent.parent / TOKENIZER
        if copy.is_file():
            return str(copy)
    return configured
