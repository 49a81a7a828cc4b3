"""``checkpoint info`` and ``checkpoint export``: look into checkpoints, and take models out of them."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import torch
import tyro

from olmo_fn.config import TrainConfig, config_from_dict
from olmo_fn.graph.flops import params_text
from olmo_fn.io.model_source import load_model
from olmo_fn.io.safetensors_export import export_model
from olmo_fn.state.checkpoint import list_checkpoints, read_manifest, resolve_checkpoint, verify_checkpoint

PathArg = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """Show a checkpoint: step, tokens, model, tensor count and bytes, versions."""

    path: PathArg
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    json: bool = False
    """Print the manifest (plus bytes on disk) as JSON instead of text."""
    print_config: bool = False
    """Print only the training config as JSON: what a run keeps as config.json (to restore a lost one)."""
    verify: bool = False
    """Also check every file against the size and SHA-256 recorded when it was written (reads it all)."""


@dataclasses.dataclass(frozen=True)
class CheckpointExport:
    """Write a checkpoint's parameters to OUT/model.safetensors plus OUT/config.json, for inference."""

    path: PathArg
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    out: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    """A new (or empty) directory for model.safetensors and config.json."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the exported weights."""


def checkpoint_info(cmd: CheckpointInfo) -> str:
    checkpoint = resolve_checkpoint(cmd.path)
    manifest = read_manifest(checkpoint)
    disk = sum(p.stat().st_size for p in checkpoint.iterdir() if p.is_file())
    cfg = _train_config(manifest, checkpoint)
    if cmd.print_config:
        return orjson.dumps(manifest["config"], option=orjson.OPT_INDENT_2).decode()
    verified = None
    if cmd.verify:
        started = time.perf_counter()
        verified = (verify_checkpoint(checkpoint, manifest), time.perf_counter() - started)
    if cmd.json:
        extra = {"path": str(checkpoint), "disk_bytes": disk}
        if verified is not None:
            extra["verified_bytes"] = verified[0]
        return orjson.dumps({**manifest, **extra}).decode()
    m = cfg.model
    others = (
        [p.name for _, p in list_checkpoints(checkpoint.parent.parent)]
        if checkpoint.parent.name == "checkpoints"
        else []
    )
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    rows = [
        ("checkpoint", str(checkpoint)),
        ("step", f"{manifest['step']:,} of {cfg.steps:,}"),
        ("tokens", f"{manifest['tokens_seen']:,} (data cursor {manifest['data_cursor']:,} instances)"),
        (
            "model",
            f"{cfg.preset}: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), "
            f"mlp {m.mlp_hidden}, vocab {m.vocab_size}; {params_text(m)}",
        ),
        ("data", f"seq_len {cfg.data.seq_len}, " + (", ".join(cfg.data.paths) or "embedded stdlib corpus")),
        (
            "optimizer",
            f"{cfg.optim.name} lr {cfg.optim.lr:g}, {cfg.schedule.decay} schedule, "
            f"warmup {cfg.schedule.warmup_steps}",
        ),
        (
            "tensors",
            f"{manifest['n_tensors']} ({manifest['tensor_bytes'] / 2**20:,.1f} MiB; "
            f"{disk / 2**20:,.1f} MiB on disk)",
        ),
        ("written", f"{manifest.get('created', '?')} by {versions}"),
        ("fingerprint", manifest["config_fingerprint"]),
        ("checksums", _checksums_row(manifest, verified)),
    ]
    if len(others) > 1:
        rows.append(("in this run", ", ".join(others)))
    return "\n".join(f"{k:<12} {v}" for k, v in rows)


def checkpoint_export(cmd: CheckpointExport) -> Path:
    checkpoint = resolve_checkpoint(cmd.path)
    manifest = read_manifest(checkpoint)
    model = load_model(checkpoint, dtype=getattr(torch, cmd.dtype))
    info = {
        "preset": manifest["config"].get("preset"),
        "step": manifest["step"],
        "tokens_seen": manifest["tokens_seen"],
        "source": str(checkpoint),
        "tokenizer": model.tokenizer,
        "eos_token_id": model.eos_token_id,
    }
    tokenizer_file = model.tokenizer if model.tokenizer not in (None, "bytes") else None
    return export_model(cmd.out, model.params, model.cfg, info, tokenizer=tokenizer_file)


def _checksums_row(manifest: dict[str, Any], verified: tuple[int, float] | None) -> str:
    if manifest["format_version"] < 2:
        return "none (format 1: written before olmo_fn recorded checksums)"
    files = manifest["files"]
    if verified is None:
        return f"SHA-256 of {len(files)} files recorded (--verify checks them)"
    size, seconds = verified[0] / 2**20, verified[1]
    return f"verified: {len(files)} files, {size:,.1f} MiB match their SHA-256 ({seconds:.2f} s)"


def _train_config(manifest: dict[str, Any], checkpoint: Path) -> TrainConfig:
    return config_from_dict(TrainConfig, manifest["config"], where=f"{checkpoint / 'manifest.json'}: config")
