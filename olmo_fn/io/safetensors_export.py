"""A model for inference: its parameters in one safetensors file, plus the model config as JSON.

``OUT/model.safetensors`` holds every parameter under its dotted olmo_fn path; ``OUT/config.json``
holds ``{"model": ModelConfig fields, ...provenance}``. Both are written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import torch
from tensordict import TensorDict

from olmo_fn.config import config_from_dict
from olmo_fn.errors import CheckpointError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import flatten, unflatten
from olmo_fn.io.atomic import atomic_write, write_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def export_model(
    out: str | os.PathLike,
    params: TensorDict,
    model: ModelConfig,
    info: dict[str, Any] | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Write `params` and `model` into the new directory `out` (refused if it holds files already).

    `info` (provenance, EOS id, ...) goes into config.json beside the model. A `tokenizer` file
    (tokenizer.json) is copied in and recorded as ``"tokenizer": "tokenizer.json"``.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output directory is not empty; refusing to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {path: t.detach().contiguous() for path, t in flatten(params).items()}
    metadata = {"format": "olmo_fn", **{k: str(v) for k, v in (info or {}).items()}}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    info = dict(info or {})
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER)
        info["tokenizer"] = TOKENIZER
    write_json(out / CONFIG, {"model": dataclasses.asdict(model), **info})
    return out


def load_exported(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[ModelConfig, TensorDict]:
    """The model config and parameters of an exported directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: not found (not an exported olmo_fn model)")
    try:
        data = orjson.loads((directory / CONFIG).read_bytes())["model"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory / CONFIG}: not a valid exported config ({exc})") from None
    model = config_from_dict(ModelConfig, data, where=f"{directory / CONFIG}: model")
    try:
        tensors = load_file(str(directory / WEIGHTS), device=str(device))
    except SafetensorError as exc:
        raise CheckpointError(f"{directory / WEIGHTS}: cannot read ({exc})") from None
    return model, unflatten(tensors)
