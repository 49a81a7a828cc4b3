"""Hugging Face model directories: read (config.json + safetensors, sharded or not) and write.

A written directory loads with ``transformers.AutoModelForCausalLM.from_pretrained``. Only
safetensors weights are read; pickled ``*.bin`` checkpoints are refused (unpickling can run code).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import torch
from tensordict import TensorDict

from olmo_fn.errors import CheckpointError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import flatten, param_shapes
from olmo_fn.io.atomic import atomic_write, write_json
from olmo_fn.io.hf_mapping import HfArch, hf_config, model_config_from_hf, params_from_hf, params_to_hf
from olmo_fn.io.paths import contained_path
from olmo_fn.io.text_tokenizer import open_tokenizer_json

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a transformers model directory (config.json with a model_type)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in orjson.loads(config.read_bytes())
    except orjson.JSONDecodeError:
        return False


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (not a Hugging Face model directory)")
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX).is_file():
        try:
            weight_map = orjson.loads((directory / INDEX).read_bytes())["weight_map"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{directory / INDEX}: not a safetensors index ({exc})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{directory / INDEX}: weight_map is not an object")
        # Names are checked before any file is opened. Links inside the directory are the owner's (a
        # hub cache links every file to its blob), so only the names themselves must stay inside.
        return [
            contained_path(directory, name, f"{directory / INDEX}: weight_map", follow_links=False)
            for name in sorted(set(weight_map.values()), key=str)
        ]
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    if list(directory.glob("*.bin")):
        raise CheckpointError(
            f"{directory}: holds only pickled *.bin weights; olmo_fn reads safetensors only "
            "(re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    raise CheckpointError(f"{directory}: no {WEIGHTS} or {INDEX}")


def read_hf_model(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[ModelConfig, TensorDict, HfArch]:
    """(model config, parameter tree, architecture) of a transformers directory; shapes are checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_hf_config(directory)
    cfg, arch = model_config_from_hf(config, where=str(directory / "config.json"))
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        if not path.is_file():
            raise CheckpointError(f"{path}: weight shard listed in the index is missing")
        try:
            state.update(load_file(str(path), device=str(device)))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from None
    params = params_from_hf(state, arch, tied=bool(config.get("tie_word_embeddings")))
    _check_shapes(directory, cfg, params)
    if dtype is not None:
        params = params.apply(lambda t: t.to(dtype))
    return cfg, params, arch


def _check_shapes(directory: Path, cfg: ModelConfig, params: TensorDict) -> None:
    expected = param_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in flatten(params).items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} (expected {expected[k]})" for k in expected if k in got and got[k] != expected[k]]
    if missing or wrong or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not match config.json: missing {missing[:3]}, "
            f"wrong shapes {wrong[:3]}, unexpected {unexpected[:3]}"
        )


def write_hf_model(
    out: str | os.PathLike,
    params: TensorDict,
    cfg: ModelConfig,
    *,
    arch: HfArch | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: str | os.PathLike | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a directory transformers loads with ``from_pretrained`` (refused if `out` holds files)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output directory is not empty; refusing to overwrite")
    config = hf_config(cfg, arch, dtype=str(dtype).removeprefix("torch."), **(extra_config or {}))
    tensors = {
        name: t.detach().to(dtype).contiguous()
        for name, t in params_to_hf(params, config["model_type"]).items()
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    if tokenizer is not None:
        _copy_tokenizer(Path(tokenizer), out, config)
    write_json(out / "config.json", config)
    return out


def _copy_tokenizer(tokenizer: Path, out: Path, config: dict[str, Any]) -> None:
    """tokenizer.json plus a tokenizer_config.json naming its special tokens (for AutoTokenizer)."""
    tok = open_tokenizer_json(tokenizer, f"tokenizer={tokenizer}")
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    special = {}
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        token_id = config.get(key)
        if token_id is not None and tok.id_to_token(token_id) is not None:
            special[key.removesuffix("_id")] = tok.id_to_token(token_id)
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **special})
