"""Checkpoints: a `TrainState` written through torch.distributed.checkpoint (DCP) plus a JSON manifest.

Layout of ``RUN/checkpoints/step{N}/``: the DCP files (``.metadata``, ``*.distcp``) and
``manifest.json`` (step, tokens, data cursor, config and fingerprint, versions, tensor count and
bytes). A checkpoint is written into ``.step{N}.tmp`` and renamed into place only when complete, so a
directory named ``step{N}`` is always whole; one being deleted is first renamed to
``.step{N}.deleting``. DCP reshards on load: a checkpoint written by any number of processes, with any
placements, loads into any other.

The manifest records the size and SHA-256 of every file; loading verifies them before reading a
tensor, so a damaged or altered file is named instead of read. Loading never unpickles arbitrary
objects and never opens a file outside the checkpoint directory: the manifest is JSON, tensors are
read with ``weights_only``, and DCP's pickled ``.metadata`` goes through `dcp_reader`, which admits
only tensor entries stored in the checkpoint's own files.

Symbolic links: olmo_fn writes every checkpoint as a real directory. A ``step{N}`` that is a link is
never deleted through (pruning leaves it alone); training refuses to resume a run that holds one
(`linked_checkpoints`), while read-only commands read it like any other checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import sys
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import orjson
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from tensordict import TensorDict
from torch.distributed.checkpoint.api import CheckpointException

from olmo_fn.errors import CheckpointError
from olmo_fn.graph.param_tree import flatten, unflatten
from olmo_fn.io.atomic import write_json
from olmo_fn.parallelize.dist import barrier, is_distributed, rank
from olmo_fn.state.checksums import file_digests, verify_files
from olmo_fn.state.dcp_reader import SafeFileSystemReader, read_safe_metadata, storage_files
from olmo_fn.state.spikes import SpikeWindow
from olmo_fn.state.train_state import TrainState, current_versions

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
"""2: the manifest records every file's size and SHA-256. 1 (read, not verified): without them."""
READABLE_VERSIONS = (1, 2)
STEP_DIR = re.compile(r"^step(\d+)$")
# DCP warns on every single-process call (also from its async writer thread) that it assumes a
# single process: that is meant here.
warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step{step}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary and half-deleted ones are skipped;
    symbolic links to directories are listed)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = STEP_DIR.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def linked_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Entries ``checkpoints/step{N}`` of a run that are symbolic links (olmo_fn never makes them)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_symlink())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if (path / "manifest.json").exists() or not (path / "checkpoints").is_dir():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise CheckpointError(f"{path}: run directory holds no complete checkpoint")
    return newest


def _tensors(state: TrainState) -> dict[str, Any]:
    return {"params": flatten(state.params), "opt": {k: flatten(v) for k, v in state.opt_state.items()}}


def manifest_of(state: TrainState) -> dict[str, Any]:
    flat = flatten(_tensors(state))
    return {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "data_cursor": state.data_cursor,
        "spikes": state.spikes.to_json(),
        "config_fingerprint": state.config_fingerprint,
        "config": dict(state.config),
        "versions": current_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_tensors": len(flat),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in flat.values()),
    }


def begin_save(
    directory: Path, state: TrainState, *, asynchronous: bool = False, group: dist.ProcessGroup | None = None
) -> tuple[Future | None, dict[str, Any]]:
    """Start writing `state` into ``.{directory.name}.tmp``; returns (DCP future if async, manifest).

    Collective when a process group exists. With `asynchronous`, tensors are copied to host memory
    before this returns (the caller may then update them in place) and written in the background.
    """
    tmp = _tmp_path(directory)
    if rank(group) == 0:
        if os.path.lexists(directory):
            raise CheckpointError(f"{directory}: a checkpoint already exists here; refusing to overwrite it")
        try:
            _remove_leftover(tmp)
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise save_failure(directory, exc) from exc
    barrier(group)
    manifest = manifest_of(state)
    kwargs = {"checkpoint_id": tmp, "no_dist": not is_distributed(), "process_group": group}
    try:
        if asynchronous:
            return dcp.async_save(_tensors(state), **kwargs), manifest
        dcp.save(_tensors(state), **kwargs)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise save_failure(directory, exc) from exc
    return None, manifest


def save_failure(directory: Path, exc: BaseException) -> CheckpointError:
    """The error for a checkpoint write that failed (a full disk, a read-only directory, ...), after
    removing its partial ``.tmp`` directory; the checkpoints written before are untouched."""
    _remove_leftover(_tmp_path(directory))
    if isinstance(exc, CheckpointError):
        return exc
    reason = _last_line(exc)
    try:
        free = shutil.disk_usage(directory.parent).free
        reason += f"; {free / 2**30:,.2f} GiB free on that disk"
    except OSError:
        pass
    return CheckpointError(
        f"{directory}: writing the checkpoint failed ({reason}); the checkpoints written before it are "
        "intact, and re-running the same command resumes from the newest"
    )


def _remove_leftover(path: Path) -> None:
    """Remove a partial directory (or a stray file or link of that name; never what a link points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def finish_save(directory: Path, manifest: dict[str, Any], *, group: dist.ProcessGroup | None = None) -> Path:
    """Record every file's checksum in the manifest, write it and rename the temporary directory into
    place (coordinator only; on an async save this runs on the background thread)."""
    if rank(group) == 0:
        tmp = _tmp_path(directory)
        try:
            # Counted from what every rank wrote (a pipeline stage's state holds only its layers).
            manifest = {**manifest, **_tensor_totals(tmp), "files": file_digests(tmp, skip=(MANIFEST,))}
            write_manifest(tmp, manifest)
            _fsync_dir(tmp)
            if os.path.lexists(directory):
                raise CheckpointError(f"{directory}: appeared while it was written; refusing to replace it")
            os.rename(tmp, directory)
            _fsync_dir(directory.parent)
        except OSError as exc:
            raise save_failure(directory, exc) from exc
    return directory


def _tensor_totals(directory: Path) -> dict[str, int]:
    """``n_tensors`` and ``tensor_bytes`` of the checkpoint written in `directory` (its DCP metadata)."""
    entries = read_safe_metadata(directory).state_dict_metadata.values()
    return {
        "n_tensors": len(entries),
        "tensor_bytes": sum(
            math.prod(e.size) * torch.empty((), dtype=e.properties.dtype).element_size() for e in entries
        ),
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_json(directory / MANIFEST, manifest)


def save_checkpoint(
    directory: str | os.PathLike, state: TrainState, *, group: dist.ProcessGroup | None = None
) -> Path:
    """Write `state` to `directory` synchronously and atomically. Collective when distributed."""
    directory = Path(directory)
    _, manifest = begin_save(directory, state, group=group)
    barrier(group)
    finish_save(directory, manifest, group=group)
    barrier(group)
    return directory


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint in `directory`, with a clear error when it is absent or not JSON."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint manifest (not a complete olmo_fn checkpoint)")
    try:
        manifest = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_VERSIONS:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(
            f"{path}: unknown checkpoint format_version {version!r} (this olmo_fn reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    problems = [
        f"{name} ({'missing' if name not in manifest else f'{manifest[name]!r} is not {kind.__name__}'})"
        for name, kind in _MANIFEST_FIELDS.items()
        if not isinstance(manifest.get(name), kind) or isinstance(manifest.get(name), bool)
    ]
    if manifest["format_version"] >= 2 and not isinstance(manifest.get("files"), dict):
        problems.append("files (missing: the per-file checksums)")
    if problems:
        raise CheckpointError(f"{path}: manifest fields are missing or malformed: {', '.join(problems)}")
    return manifest


_MANIFEST_FIELDS = {
    "step": int,
    "tokens_seen": int,
    "data_cursor": int,
    "config": dict,
    "config_fingerprint": str,
    "n_tensors": int,
    "tensor_bytes": int,
}


def verify_checkpoint(
    directory: str | os.PathLike,
    manifest: dict[str, Any] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> int:
    """Check the checkpoint's files against the sizes and SHA-256 digests in its manifest, and that its
    DCP metadata is safe to read; returns the bytes hashed here (0 for a format-1 checkpoint, which has
    no checksums). Raises CheckpointError naming the first file that is wrong.

    Collective when a process group exists: the ranks hash a share of the files each and every rank
    raises the same error."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    metadata = read_safe_metadata(directory)
    if manifest["format_version"] < 2:
        return 0
    required = storage_files(metadata) | {".metadata"}
    where = str(directory / MANIFEST)
    if not is_distributed():
        return verify_files(directory, manifest["files"], required=required, where=where)
    share = (rank(group), dist.get_world_size(group))
    problem, hashed = "", 0
    try:
        hashed = verify_files(directory, manifest["files"], required=required, where=where, share=share)
    except CheckpointError as exc:
        problem = str(exc)
    problems: list[str] = [""] * share[1]
    dist.all_gather_object(problems, problem, group=group)
    if any(problems):
        raise CheckpointError(next(p for p in problems if p))
    return hashed


def load_checkpoint(
    directory: str | os.PathLike, template: TrainState, *, group: dist.ProcessGroup | None = None
) -> TrainState:
    """The state saved in `directory`, read into the buffers of `template`.

    The template fixes device, dtype and placements (plain tensors or DTensors of any layout); DCP
    reshards and casts. Shapes must match the saved ones; every mismatch is named.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_checkpoint(directory, manifest, group=group)
    _load_tensors(directory, _tensors(template), group=group)
    return dataclasses.replace(
        template,
        step=manifest["step"],
        tokens_seen=manifest["tokens_seen"],
        data_cursor=manifest["data_cursor"],
        spikes=_spike_window(manifest, directory),
        config=manifest["config"],
        config_fingerprint=manifest["config_fingerprint"],
        versions=manifest.get("versions", {}),
    )


def _spike_window(manifest: dict[str, Any], directory: Path) -> SpikeWindow:
    """The manifest's spike window (an empty one in checkpoints written before it was kept)."""
    if "spikes" not in manifest:
        return SpikeWindow()
    try:
        return SpikeWindow.from_json(manifest["spikes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / MANIFEST}: spikes is malformed ({exc})") from None


def load_params(directory: str | os.PathLike, template_params: TensorDict) -> TensorDict:
    """Only the parameters of a checkpoint, read into `template_params` (any device, dtype, placement)."""
    directory = Path(directory)
    verify_checkpoint(directory)
    tensors = {"params": flatten(template_params)}
    _load_tensors(directory, tensors, only_prefix="params.")
    return unflatten(tensors["params"])


def _load_tensors(
    directory: Path, tensors: dict[str, Any], *, only_prefix: str = "", group: dist.ProcessGroup | None = None
) -> None:
    _check_shapes(directory, flatten(tensors), only_prefix=only_prefix, group=group)
    try:
        with torch.no_grad():
            dcp.load(
                tensors,
                storage_reader=SafeFileSystemReader(directory),
                no_dist=not is_distributed(),
                process_group=group,
            )
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(f"{directory}: cannot read checkpoint tensors: {_last_line(exc)}") from exc


def prune_checkpoints(run_dir: str | os.PathLike, *, keep_last: int, permanent_every: int) -> list[Path]:
    """Delete complete checkpoints other than the newest `keep_last` and every `permanent_every`-th step.

    A checkpoint is renamed to ``.step{N}.deleting`` before its files go, so a crash mid-delete never
    leaves something that looks complete. Symbolic links are never deleted through (nor counted).
    Pruning never fails a run: a checkpoint that cannot be deleted is reported on stderr and kept.
    Returns the deleted paths.
    """
    found = [(step, path) for step, path in list_checkpoints(run_dir) if not path.is_symlink()]
    keep = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    if permanent_every > 0:
        keep |= {step for step, _ in found if step % permanent_every == 0}
    deleted = []
    for step, path in found:
        if step not in keep:
            doomed = path.with_name(f".{path.name}.deleting")
            try:
                os.rename(path, doomed)
                shutil.rmtree(doomed)
            except OSError as exc:
                print(f"warning: could not delete old checkpoint {path}: {exc}", file=sys.stderr)
                continue
            deleted.append(path)
    return deleted


def remove_incomplete(run_dir: str | os.PathLike) -> list[Path]:
    """Remove leftovers of interrupted saves and deletes (``.step*.tmp``, ``.step*.deleting``)."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".step") and child.name.endswith((".tmp", ".deleting")):
                if child.is_symlink() or not child.is_dir():
                    child.unlink()  # the name only, never what a link points to
                else:
                    shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def _check_shapes(
    directory: Path,
    expected: dict[str, torch.Tensor],
    only_prefix: str = "",
    group: dist.ProcessGroup | None = None,
) -> None:
    """Compare the checkpoint's tensor names and shapes with the template's, naming every difference.

    Under a process group a tensor is unexpected only if no rank's template holds it (a pipeline
    stage loads its own layers)."""
    saved = read_safe_metadata(directory).state_dict_metadata
    if only_prefix:
        saved = {k: v for k, v in saved.items() if k.startswith(only_prefix)}
    missing = sorted(set(expected) - set(saved))
    held = set(expected)
    if is_distributed():
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, sorted(expected), group=group)
        held = set().union(*every)
    unexpected = sorted(set(saved) - held)
    mismatched = [
        f"{k} saved {tuple(saved[k].size)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(saved) & set(expected), key=lambda k: (k.startswith("opt."), k))  # params first
        if tuple(getattr(saved[k], "size", ())) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:3])}...)")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) ({', '.join(unexpected[:3])}...)")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:3])}")
    if problems:
        raise CheckpointError(f"{directory}: checkpoint does not match this model: " + "; ".join(problems))


def _tmp_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.tmp")


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
