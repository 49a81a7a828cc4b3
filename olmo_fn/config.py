"""`TrainConfig`: everything that defines a training run, as one frozen dataclass.

The CLI (`olmo_fn.run`) is generated from it by tyro; notebooks build it directly. It is stored as
``config.json`` in every run directory and can be read back with `config_from_json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import orjson

from olmo_fn.callbacks.config import LogConfig, ProfileConfig
from olmo_fn.errors import ConfigError
from olmo_fn.evaluate import EvalConfig
from olmo_fn.graph.config import ModelConfig, matrix_dims
from olmo_fn.graph.model import AttentionBackend
from olmo_fn.graph.presets import PRESETS
from olmo_fn.io.loader import DataConfig
from olmo_fn.parallelize.activation_checkpoint import ActivationCheckpointing, checkpointing_problems
from olmo_fn.parallelize.fp8 import Fp8Recipe, fp8_problems
from olmo_fn.parallelize.parallel_config import ParallelConfig
from olmo_fn.state.checkpoint_writer import CheckpointConfig
from olmo_fn.state.compiled_step import step_compile_problems
from olmo_fn.state.moe_terms import moe_run_problems
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.spikes import SpikeConfig

PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
DEFAULT_PRESET = "olmo2-tiny"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train a language model; with no options, the tiny OLMo 2 on the embedded stdlib corpus (minutes)."""

    preset: PresetName = DEFAULT_PRESET
    """Model size; --model.* options override single fields of it."""
    model: ModelConfig = PRESETS[DEFAULT_PRESET]
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    spike: SpikeConfig = SpikeConfig()
    """Skip the update of a step whose loss or gradient norm spikes (off by default)."""
    steps: int = 600
    """Optimizer updates in the run."""
    global_batch_size: int = 16
    """Instances (sequences of data.seq_len tokens) per optimizer update."""
    micro_batch_size: int | None = None
    """Instances per forward/backward pass; gradients accumulate over global/micro passes. Default: global."""
    seed: int = 0
    """Seeds the parameter init and the data order."""
    z_loss: float = 1e-5
    """Weight of the z-loss term mean(logsumexp(logits)²); 0 disables it."""
    max_grad_norm: float | None = 1.0
    """Clip gradients to this global L2 norm; None only measures it."""
    document_masking: bool = True
    """Attend only within documents, and restart RoPE positions at each document."""
    attention_backend: AttentionBackend = "auto"
    """auto: FlexAttention on CUDA, SDPA with a dense mask elsewhere."""
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype (parameters and optimizer state stay fp32). auto: bfloat16 on CUDA, float32 on CPU."""
    compile: Literal["auto", "on", "off", "step"] = "auto"
    """on: compile the transformer block with torch.compile (one graph for all layers); step: compile
    the whole update (forward, backward, clipping, AdamW) as one graph, in one process; auto: on for
    CUDA (and wherever --ac budget needs the compiler), else off."""
    ac: ActivationCheckpointing = "none"
    """Activation checkpointing of every block. full: keep only block inputs, recompute the rest;
    selective: keep matmul and attention outputs, recompute norms, activations and parameter gathers;
    budget: torch.compile's partitioner keeps at most --ac-budget of the activations (needs compile)."""
    ac_budget: float = 0.5
    """With --ac budget: the share of an unchecked block's activations that may be kept, in (0, 1]."""
    fp8: Fp8Recipe = "none"
    """Multiply the block linears in float8 through torchao (the fp8 extra): tensorwise or rowwise
    dynamic scaling; the embedding and LM head stay in the compute dtype. Emulated on CPU."""
    loss_chunk_tokens: int | None = None
    """Compute the LM head and loss this many positions at a time, never holding the whole logits or
    their gradient. None (auto): chunks of 4096 when a micro-batch's logits would exceed 2^26 values;
    0: never."""
    threads: int | None = None
    """Intra-op CPU threads. None: OMP_NUM_THREADS when set, else the cores not busy with other work
    when the run starts (a run on a shared machine then slows down gently instead of collapsing)."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    parallel: ParallelConfig = ParallelConfig()
    log: LogConfig = LogConfig()
    profile: ProfileConfig = ProfileConfig()
    run_dir: str | None = None
    """Where config.json, metrics.jsonl and checkpoints go. Default: runs/<preset>-<date>-<time>.
    A directory that already holds a run is resumed from its newest complete checkpoint."""
    resume: bool = False
    """Require resuming: an error unless run_dir holds a checkpoint (never a silent fresh start)."""
    allow_config_change: bool = False
    """On resume, accept changes to fields that change the training math (e.g. a new schedule)."""
    init_from: str | None = None
    """Start a new run (step 0, zero optimizer moments, data from the start) from the weights of a run
    directory, checkpoint, export or Hugging Face model directory, whose model (and tokenizer) the run
    takes; --model.* flags may change fields that keep the shapes. Not read when the run resumes."""

    def __post_init__(self) -> None:
        problems = []
        if self.init_from is not None and not self.init_from.strip():
            problems.append(
                "init_from='' must name a run directory, checkpoint, export or Hugging Face model directory"
            )
        for name in ("steps", "global_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        micro = self.micro_batch_size
        if micro is not None and micro < 1:
            problems.append(f"micro_batch_size={micro} must be >= 1")
        elif micro is not None and self.global_batch_size % micro:
            problems.append(
                f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size={micro}"
            )
        pp_schedule = self.parallel.pp_schedule if self.parallel.pp > 1 else None
        problems += checkpointing_problems(self.ac, self.ac_budget, pp_schedule)
        problems += fp8_problems(self.fp8, matrix_dims(self.model))
        problems += moe_run_problems(
            self.model, self.parallel, compile_step=self.compile == "step", fp8=self.fp8
        )
        if self.compile == "step":
            problems += step_compile_problems(self, sharded=self.parallel.splits_work)
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 0:
            problems.append(f"loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0: never chunk)")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads={self.threads} must be >= 1 (or None: chosen from the idle cores)")
        if not 0 <= self.z_loss < math.inf:
            problems.append(f"z_loss={self.z_loss} must be finite and >= 0")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            problems.append(f"max_grad_norm={self.max_grad_norm} must be finite and > 0 (or None)")
        schedule = self.schedule
        if schedule.start_step >= self.steps:
            problems.append(
                f"schedule.start_step={schedule.start_step} must be below steps={self.steps} "
                "(the schedule runs from it to the last step)"
            )
        elif schedule.warmup_steps > self.steps - schedule.start_step:
            covered = "steps" if not schedule.start_step else "steps - schedule.start_step"
            problems.append(
                f"schedule.warmup_steps={schedule.warmup_steps} is longer than the {covered}="
                f"{self.steps - schedule.start_step} the schedule covers (set --schedule.warmup-steps)"
            )
        if problems:
            raise ConfigError("invalid train config: " + "; ".join(problems))

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.global_batch_size


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


RUNTIME_FIELDS = frozenset(
    {
        "preset",  # a name only; the model fields carry the sizes
        "micro_batch_size",  # accumulation is normalised to equal the whole batch
        "attention_backend",
        "device",
        "dtype",
        "compile",
        "ac",  # recomputation and chunking change only float rounding, not the math
        "ac_budget",
        "loss_chunk_tokens",
        "fp8",  # a numeric format, like dtype
        "threads",
        "parallel",  # placements change where the math runs, not what it computes
        "checkpoint",
        "eval",
        "log",  # loggers and the profiler watch a run; they never change it
        "profile",
        "run_dir",
        "resume",
        "allow_config_change",
        "init_from",  # only a new run reads it; a resumed run continues from its own checkpoints
        "data.tokenizer",  # describes the token files; the tokens themselves are what train
    }
)
"""TrainConfig fields (dotted for nested ones) that change how a run executes or describe it, not what
it computes. Every other field (model, data, optim, schedule, steps, batch size, seed, ...) changes
the training math."""


def math_fields(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """The fields of a config (dataclass or its JSON dict) that change the training math, flattened
    to dotted names."""
    data = config_to_dict(config) if dataclasses.is_dataclass(config) else config
    flat = _flatten(data)
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in RUNTIME_FIELDS)}


def config_fingerprint(config: TrainConfig | dict[str, Any]) -> str:
    """A short digest of the fields that change the training math."""
    fields = orjson.dumps(math_fields(config), option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(fields, digest_size=8).hexdigest()


def math_differences(old: TrainConfig | dict[str, Any], new: TrainConfig | dict[str, Any]) -> list[str]:
    """``"field: old -> new"`` for every math-changing field that differs between two configs."""
    a, b = math_fields(old), math_fields(new)
    return [
        f"{k}: {_show(a.get(k))} -> {_show(b.get(k))}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _show(value: Any) -> str:
    return orjson.dumps(value).decode()


def config_from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a dict such as ``config.json``, naming any unknown or mistyped field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
        )
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in data
    ]
    if required:
        raise ConfigError(f"{where}: missing required field(s) {', '.join(required)}")
    kwargs = {name: _from_json(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _from_json(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _from_json(options[0], value, where) if len(options) == 1 else value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {_show(value)}")
            items = list(args)
        return tuple(
            _from_json(item, v, f"{where}[{i}]") for i, (item, v) in enumerate(zip(items, value, strict=True))
        )
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(map(repr, typing.get_args(hint)))}"
            )
        return value
    if hint in _SCALARS:
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, _SCALARS[hint]):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return hint(value)
    return value


_SCALARS = {bool: bool, int: int, float: (int, float), str: str}


def config_from_json(path: str | Path) -> TrainConfig:
    """Read a TrainConfig from a JSON file (e.g. a run's config.json)."""
    path = Path(path)
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return config_from_dict(TrainConfig, data, where=str(path))
