"""`train --init-from PATH`: a new run (step 0, zero optimizer moments, data from the start) that starts
from the weights of a run directory, a checkpoint, an olmo_fn export or a Hugging Face model directory.

The source decides the architecture: `with_init_source` takes the model config (and the tokenizer, when
the source names one) from it before any ``--model.*`` flag applies, so flags can change single fields
that keep every parameter's shape (e.g. ``--model.rope-theta``); a change of shape is refused by
`state_from_source`, naming the field and both values. Only a new run reads the source: a run that has
checkpoints resumes from them and never looks at it again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import torch

from olmo_fn.config import TrainConfig
from olmo_fn.errors import CheckpointError, ConfigError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import flatten, param_shapes, unflatten
from olmo_fn.io.model_source import describe_model, load_model
from olmo_fn.state.optim import init_opt_state
from olmo_fn.state.train_state import TrainState

if TYPE_CHECKING:
    from collections.abc import Mapping

    from olmo_fn.io.loader import DataConfig

TOKENIZER_FIELDS = ("model", "added_tokens", "normalizer", "pre_tokenizer")
"""The parts of a tokenizer.json that decide which ids a text becomes: two files that agree on them
tokenize alike, whatever else (padding, truncation, formatting) differs."""


def with_init_source(cfg: TrainConfig, path: str, *, preset: str | None = None) -> TrainConfig:
    """`cfg` starting from the source at `path`: its model config, its tokenizer as the data's unless
    `cfg` names another one than the default ("bytes"), and its EOS id as the data's unless `cfg` sets
    one. `preset`: a --preset given as well, which is refused (the source decides the model)."""
    if preset is not None:
        raise ConfigError(
            f"--preset {preset} and --init-from {path} both choose the model; drop --preset "
            "(with --init-from the architecture is the source's; --model.* flags may change single fields)"
        )
    if not Path(path).exists():
        raise CheckpointError(f"init_from={path}: no such run directory, checkpoint, export or model")
    info = describe_model(path)
    data = cfg.data
    if info.tokenizer is not None and data.tokenizer == "bytes":
        data = dataclasses.replace(data, tokenizer=info.tokenizer)
    if info.eos_token_id is not None and data.eos_token_id is None:
        data = dataclasses.replace(data, eos_token_id=info.eos_token_id)
    return dataclasses.replace(cfg, model=info.cfg, data=data, init_from=str(path))


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
