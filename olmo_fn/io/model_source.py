"""Load a model for inference from wherever it lives: a run directory, a checkpoint, an olmo_fn export,
or a Hugging Face model directory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import orjson
import torch
from tensordict import TensorDict

from olmo_fn.config import TrainConfig, config_from_dict
from olmo_fn.errors import CheckpointError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.init import empty_params
from olmo_fn.io.byte_tokenizer import BYTE_EOS
from olmo_fn.io.hf_checkpoint import is_hf_dir, read_hf_config, read_hf_model
from olmo_fn.io.hf_mapping import model_config_from_hf
from olmo_fn.io.paths import contained_path
from olmo_fn.io.safetensors_export import load_exported
from olmo_fn.run_dir import run_tokenizer
from olmo_fn.state.checkpoint import load_params, read_manifest, resolve_checkpoint


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with what is known about its tokenizer."""

    cfg: ModelConfig
    params: TensorDict
    tokenizer: str | None
    """"bytes", a tokenizer.json path, or None when the source does not say."""
    eos_token_id: int | None
    source: str
    """What was read: "checkpoint", "export" or "huggingface"."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What a model's files say about it, read without its weights."""

    cfg: ModelConfig
    tokenizer: str | None
    """"bytes", a tokenizer.json path, or None when the source does not say."""
    eos_token_id: int | None
    kind: str
    """"checkpoint", "export" or "huggingface"."""
    path: Path
    """Where the weights are: the directory, or for a run the checkpoint it resolves to."""


def describe_model(path: str | os.PathLike) -> ModelSource:
    """The config, tokenizer and end-of-text id of the model at `path`, from its config files only;
    a CheckpointError names what is missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model, checkpoint or run directory")
    if is_hf_dir(path):
        config = read_hf_config(path)
        cfg, _ = model_config_from_hf(config, where=str(path / "config.json"))
        tokenizer = str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
        eos = _checked_eos(config.get("eos_token_id"), cfg.vocab_size, path / "config.json")
        return ModelSource(cfg, tokenizer, eos, "huggingface", path)
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        where = path / "config.json"
        info = _json_object(where)
        cfg = config_from_dict(ModelConfig, info.get("model"), where=f"{where}: model")
        tokenizer = info.get("tokenizer")
        if tokenizer not in (None, "bytes"):  # copied in: a name inside the export
            copy = contained_path(path, tokenizer, f"{where}: tokenizer", follow_links=True)
            if not copy.is_file():
                raise CheckpointError(f"{where}: tokenizer {copy} not found (the export is incomplete)")
            tokenizer = str(copy)
        eos = _checked_eos(info.get("eos_token_id"), cfg.vocab_size, where)
        return ModelSource(cfg, tokenizer, eos, "export", path)
    checkpoint = resolve_checkpoint(path)
    manifest = read_manifest(checkpoint)
    train_cfg = config_from_dict(
        TrainConfig, manifest["config"], where=f"{checkpoint / 'manifest.json'}: config"
    )
    tokenizer, eos = tokenizer_of(train_cfg)
    return ModelSource(train_cfg.model, run_tokenizer(checkpoint, tokenizer), eos, "checkpoint", checkpoint)


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Read the model at `path` (see the module docstring) onto `device` in `dtype`."""
    source = describe_model(path)
    if source.kind == "huggingface":
        _, params, _ = read_hf_model(source.path, device=device, dtype=dtype)
    elif source.kind == "export":
        _, params = load_exported(source.path, device=device)
        params = params.apply(lambda t: t.to(dtype))
    else:
        params = load_params(source.path, empty_params(source.cfg, device=device, dtype=dtype))
    return LoadedModel(source.cfg, params, source.tokenizer, source.eos_token_id, source.kind)


def _json_object(path: Path) -> dict:
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _checked_eos(eos: object, vocab_size: int, where: Path) -> int | None:
    """A Hugging Face config's eos_token_id (None when absent or a list), refused outside the vocabulary."""
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    for token_id in ids:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_size:
            raise CheckpointError(
                f"{where}: eos_token_id={eos!r} is outside the vocabulary (vocab_size={vocab_size})"
            )
    return eos if isinstance(eos, int) else None


def tokenizer_of(train_cfg: TrainConfig) -> tuple[str, int | None]:
    """(tokenizer, EOS id) of a training config's data."""
    data = train_cfg.data
    return data.tokenizer, data.eos_token_id if data.paths or data.sources else BYTE_EOS
