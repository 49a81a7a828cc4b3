"""Checkpoints: a `TrainState` written through torch.distributed.checkpoint (DCP) plus a JSON manifest.

Layout of ``checkpoints/step{N}/``: the DCP files (``.metadata``, ``*.distcp``) and ``manifest.json``
(step, tokens, data cursor, config and its fingerprint, versions). A checkpoint is written into a
temporary sibling directory and renamed into place when complete, so a directory named ``step{N}``
is always whole. Loading reads tensors only (no unpickling of arbitrary objects).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import orjson
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

import olmo_fn
from olmo_fn.errors import CheckpointError
from olmo_fn.graph.param_tree import flatten
from olmo_fn.state.train_state import TrainState

MANIFEST = "manifest.json"
_SINGLE_PROCESS_WARNING = ".*assuming the intent is to (save|load) in a single process"
FORMAT_VERSION = 1


def _tensors(state: TrainState) -> dict[str, Any]:
    return {
        "params": flatten(state.params),
        "opt": {name: flatten(tree) for name, tree in state.opt_state.items()},
    }


def _single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def save_checkpoint(directory: str | os.PathLike, state: TrainState, config: dict[str, Any]) -> Path:
    """Write `state` (and the run's `config`, as JSON) to `directory`, atomically."""
    directory = Path(directory)
    if directory.exists():
        raise CheckpointError(f"{directory}: a checkpoint already exists here; refusing to overwrite it")
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = _tensors(state)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        dcp.save(tensors, checkpoint_id=tmp, no_dist=_single_process())
    flat = flatten(tensors)
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "data_cursor": state.data_cursor,
        "config_fingerprint": state.config_fingerprint,
        "config": config,
        "olmo_fn_version": olmo_fn.__version__,
        "torch_version": torch.__version__,
        "n_tensors": len(flat),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in flat.values()),
    }
    (tmp / MANIFEST).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    _fsync_dir(tmp)
    os.rename(tmp, directory)
    _fsync_dir(directory.parent)
    return directory


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint in `directory`, with a clear error when it is absent or not JSON."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint manifest (not a complete olmo_fn checkpoint)")
    try:
        manifest = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected format_version {FORMAT_VERSION})")
    return manifest


def load_checkpoint(directory: str | os.PathLike, template: TrainState) -> TrainState:
    """The state saved in `directory`, loaded into the buffers of `template` (same shapes/placements)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    tensors = _tensors(template)
    _check_shapes(directory, flatten(tensors))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            dcp.load(tensors, checkpoint_id=directory, no_dist=_single_process())
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(f"{directory}: cannot read checkpoint tensors: {_last_line(exc)}") from exc
    return dataclasses.replace(
        template,
        step=manifest["step"],
        tokens_seen=manifest["tokens_seen"],
        data_cursor=manifest["data_cursor"],
        config_fingerprint=manifest["config_fingerprint"],
    )


def _check_shapes(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    """Compare the checkpoint's tensor names and shapes with the model's, naming every difference."""
    try:
        saved = FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as exc:
        raise CheckpointError(f"{directory}: cannot read the DCP metadata: {_last_line(exc)}") from exc
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
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


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
