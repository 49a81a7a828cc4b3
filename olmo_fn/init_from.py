"""`train --init-from PATH`: a new run (step 0, zero optimizer moments, data from the start) that starts
from the weights of a run directory, a checkpoint, an olmo_fn export or a Hugging Face model directory.

The source decides the architecture: `with_init_source` takes the model config (and the tokenizer, when
the source names one) from it before any ``--model.*`` flag applies, so flags can change single fields
that keep every parameter's shape (e.g. ``--model.rope-theta``); a change of shape is refused by
`state_from_source`, naming the field and both values. Only a new run reads the source: a run that has
checkpoints resumes from them and never looks at it again.

`olmo_fn.config` imports this module for the field's check, so the parts that import `olmo_fn.config`
themselves (reading a checkpoint's config, loading the weights) are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import torch

from olmo_fn.errors import CheckpointError, ConfigError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import flatten, param_shapes, unflatten
from olmo_fn.io.hf_checkpoint import is_hf_dir, read_hf_config
from olmo_fn.io.hf_mapping import model_config_from_hf
from olmo_fn.io.paths import contained_path
from olmo_fn.run_dir import run_tokenizer
from olmo_fn.state.checkpoint import read_manifest, resolve_checkpoint
from olmo_fn.state.optim import init_opt_state
from olmo_fn.state.train_state import TrainState

if TYPE_CHECKING:
    from collections.abc import Mapping

    from olmo_fn.config import TrainConfig
    from olmo_fn.io.loader import DataConfig

TOKENIZER_FIELDS = ("model", "added_tokens", "normalizer", "pre_tokenizer")
"""The parts of a tokenizer.json that decide which ids a text becomes: two files that agree on them
tokenize alike, whatever else (padding, truncation, formatting) differs."""


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What a source says about the run it starts, read without its weights."""

    model: ModelConfig
    tokenizer: str | None
    """"bytes", a tokenizer.json path, or None when the source names none."""
    eos_token_id: int | None = None
    """The end-of-document id the source was trained with, when it names one id in its vocabulary."""


def init_from_problems(init_from: str | None) -> list[str]:
    """Why `init_from` (TrainConfig.init_from) cannot name a source, as config problems. Whether the
    source exists is checked only when a new run starts: a run resumes without it."""
    if init_from is not None and not init_from.strip():
        return ["init_from='' must name a run directory, checkpoint, export or Hugging Face model directory"]
    return []


def source_info(path: str | Path) -> SourceInfo:
    """The model config and tokenizer of the source at `path` (the kinds `load_model` reads), from its
    config files only."""
    from olmo_fn.config import TrainConfig, config_from_dict
    from olmo_fn.io.model_source import tokenizer_of

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"init_from={path}: no such run directory, checkpoint, export or model")
    if is_hf_dir(path):
        config = read_hf_config(path)
        model, _ = model_config_from_hf(config, where=str(path / "config.json"))
        tokenizer = path / "tokenizer.json"
        eos = _eos_in(config.get("eos_token_id"), model)
        return SourceInfo(model, str(tokenizer) if tokenizer.is_file() else None, eos)
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        where = path / "config.json"
        info = _json_object(where)
        model = config_from_dict(ModelConfig, info.get("model"), where=f"{where}: model")
        tokenizer = info.get("tokenizer")
        if tokenizer not in (None, "bytes"):  # copied in: a name inside the export
            tokenizer = str(contained_path(path, tokenizer, f"{where}: tokenizer", follow_links=True))
        return SourceInfo(model, tokenizer, _eos_in(info.get("eos_token_id"), model))
    checkpoint = resolve_checkpoint(path)
    manifest = read_manifest(checkpoint)
    train_cfg = config_from_dict(
        TrainConfig, manifest["config"], where=f"{checkpoint / 'manifest.json'}: config"
    )
    tokenizer, eos = tokenizer_of(train_cfg)
    return SourceInfo(train_cfg.model, run_tokenizer(checkpoint, tokenizer), _eos_in(eos, train_cfg.model))


def _eos_in(eos: object, model: ModelConfig) -> int | None:
    """`eos` when it is one id inside `model`'s vocabulary, else None (absent, a list, out of range)."""
    valid = isinstance(eos, int) and not isinstance(eos, bool) and 0 <= eos < model.vocab_size
    return eos if valid else None


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def with_init_source(cfg: TrainConfig, path: str, *, preset: str | None = None) -> TrainConfig:
    """`cfg` starting from the source at `path`: its model config, its tokenizer as the data's unless
    `cfg` names another one than the default ("bytes"), and its EOS id as the data's unless `cfg` sets
    one. `preset`: a --preset given as well, which is refused (the source decides the model)."""
    if preset is not None:
        raise ConfigError(
            f"--preset {preset} and --init-from {path} both choose the model; drop --preset "
            "(with --init-from the architecture is the source's; --model.* flags may change single fields)"
        )
    info = source_info(path)
    data = cfg.data
    if info.tokenizer is not None and data.tokenizer == "bytes":
        data = dataclasses.replace(data, tokenizer=info.tokenizer)
    if info.eos_token_id is not None and data.eos_token_id is None:
        data = dataclasses.replace(data, eos_token_id=info.eos_token_id)
    return dataclasses.replace(cfg, model=info.model, data=data, init_from=str(path))


def recorded_init_from(cfg: TrainConfig, resumed_config: Mapping[str, Any] | None) -> TrainConfig:
    """`cfg` with the init_from that a resumed run was started with (`resumed_config`: its checkpoint's
    config; None for a run that does not resume). A resumed run never reads its source again, whatever
    the command says; this keeps config.json and later checkpoints naming where its weights came from."""
    if resumed_config is None:
        return cfg
    saved = resumed_config.get("init_from")
    saved = saved if isinstance(saved, str) and saved.strip() else None
    return cfg if saved == cfg.init_from else dataclasses.replace(cfg, init_from=saved)


def shape_mismatches(run: ModelConfig, source: ModelConfig) -> list[str]:
    """``model.FIELD=run value (the source has source value)`` for each field of `run` that gives a
    parameter a different shape (or a different set of parameters) than `source`; [] when every
    shape agrees. A field counts when changing it alone in `source` changes the shapes; when no
    single field does, every differing field is named."""
    if param_shapes(run) == param_shapes(source):
        return []
    differing = [
        f.name for f in dataclasses.fields(ModelConfig) if getattr(run, f.name) != getattr(source, f.name)
    ]
    shaping = [name for name in differing if _changes_shapes(source, name, getattr(run, name))]
    return [
        f"model.{name}={getattr(run, name)!r} (the source has {getattr(source, name)!r})"
        for name in shaping or differing
    ]


def _changes_shapes(source: ModelConfig, name: str, value: object) -> bool:
    try:
        changed = dataclasses.replace(source, **{name: value})
    except ConfigError:
        return True  # not even a valid model with the source's other sizes
    return param_shapes(changed) != param_shapes(source)


def same_tokenizer(a: str, b: str) -> bool:
    """Whether tokenizers `a` and `b` ("bytes" or tokenizer.json paths) turn text into the same ids:
    the same name, the same file, or files that agree on `TOKENIZER_FIELDS`."""
    if a == b:
        return True
    if "bytes" in (a, b):
        return False
    if Path(a).resolve() == Path(b).resolve():
        return True
    first, second = (_tokenizer_json(name) for name in (a, b))
    return all(first.get(key) == second.get(key) for key in TOKENIZER_FIELDS)


def _tokenizer_json(name: str) -> dict[str, Any]:
    try:
        data = orjson.loads(Path(name).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read it as a tokenizer.json ({exc})") from None
    return data if isinstance(data, dict) else {}


def tokenizer_problem(data: DataConfig, source_tokenizer: str | None, init_from: str) -> str | None:
    """Why the data cannot train a model whose tokenizer is `source_tokenizer`, or None."""
    if source_tokenizer is None:
        return None  # the source does not say: the data's tokenizer is the run's
    if not (data.paths or data.sources):
        if source_tokenizer == "bytes":
            return None
        return (
            f"init_from={init_from} uses the tokenizer {source_tokenizer}, but the embedded corpus is "
            "byte-tokenized; give --data.paths prepared with that tokenizer "
            f"(prepare-data --tokenizer {source_tokenizer})"
        )
    if same_tokenizer(data.tokenizer, source_tokenizer):
        return None
    return (
        f"data.tokenizer={data.tokenizer} is not the tokenizer of init_from={init_from} "
        f"({source_tokenizer}): the data must be tokenized as the model was (prepare-data --tokenizer "
        "with that file, and give it as --data.tokenizer)"
    )


def state_from_source(
    cfg: TrainConfig,
    *,
    device: torch.device | str,
    config: Mapping[str, Any] | None = None,
    config_fingerprint: str = "",
) -> TrainState:
    """Step 0 of a new run from the weights of ``cfg.init_from`` (fp32, on `device`), with the zero
    state of ``cfg.optim`` and data cursor 0.

    Raises a ConfigError before anything is written when ``cfg.model`` gives a parameter another shape
    than the source's, or when the data's tokenizer is not the source's.
    """
    from olmo_fn.io.model_source import load_model

    if cfg.init_from is None:
        raise ConfigError("state_from_source needs init_from: the source to start from")
    source = load_model(cfg.init_from, device=device, dtype=torch.float32)
    mismatches = shape_mismatches(cfg.model, source.cfg)
    if mismatches:
        raise ConfigError(
            f"init_from={cfg.init_from}: the source's weights do not fit {'; '.join(mismatches)}; "
            "with --init-from the model comes from the source (drop those --model.* options)"
        )
    problem = tokenizer_problem(cfg.data, source.tokenizer, cfg.init_from)
    if problem:
        raise ConfigError(problem)
    flat = flatten(source.params)
    params = unflatten(
        {
            path: flat[path].detach().to(device=device, dtype=torch.float32).contiguous().requires_grad_(True)
            for path in param_shapes(cfg.model)
        }
    )
    return TrainState(
        step=0,
        params=params,
        opt_state=init_opt_state(params, cfg.optim),
        data_cursor=0,
        tokens_seen=0,
        config=dict(config or {}),
        config_fingerprint=config_fingerprint,
    )
