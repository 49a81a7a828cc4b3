"""`LogConfig` and `ProfileConfig`: where a run's metrics go besides metrics.jsonl, and which steps
the torch profiler records. Both are runtime options: they never change what a run computes."""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from olmo_fn.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Loggers besides metrics.jsonl and the progress line (rank 0 only under torchrun)."""

    wandb: bool = False
    """Log every metrics.jsonl record to Weights & Biases (the wandb extra). WANDB_MODE=offline keeps
    the run on disk (`wandb sync` uploads it later)."""
    wandb_project: str = "olmo_fn"
    """The W&B project."""
    wandb_name: str | None = None
    """The W&B run name. Default: the run directory's name."""
    wandb_dir: str | None = None
    """Where W&B keeps its files (a wandb/ folder is made inside). Default: the run directory."""
    tensorboard: bool = False
    """Write every metrics.jsonl record as TensorBoard scalars (float64) into RUN_DIR/tensorboard
    (the tensorboard extra)."""

    def __post_init__(self) -> None:
        if not self.wandb_project.strip():
            raise ConfigError("log.wandb_project='' must name a W&B project")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """The torch profiler over a range of steps."""

    steps: str | None = None
    """FIRST:LAST: profile updates FIRST to LAST, both included (10:12 profiles steps 10, 11 and 12);
    writes RUN_DIR/profile/stepsFIRST-LAST.json (a Chrome trace: chrome://tracing or Perfetto) and
    a table of the costliest operators beside it. None: no profiling."""

    def __post_init__(self) -> None:
        if self.steps is not None:
            profile_range(self.steps)

    @property
    def range(self) -> tuple[int, int] | None:
        """``(first, last)`` step to profile, both included, or None."""
        return None if self.steps is None else profile_range(self.steps)


def profile_range(text: str) -> tuple[int, int]:
    """``"10:12"`` -> ``(10, 12)``; a one-line ConfigError for anything else."""
    first, sep, last = text.partition(":")
    try:
        a, b = int(first), int(last)
    except ValueError:
        a = b = -1
    if not sep or a < 1 or b < a:
        raise ConfigError(
            f"profile.steps={text!r} must be FIRST:LAST with 1 <= FIRST <= LAST "
            "(e.g. 10:12 profiles steps 10, 11 and 12)"
        )
    return a, b


def require_module(module: str, option: str, extra: str) -> ModuleType:
    """Import an optional dependency, or raise a one-line ConfigError naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"{option} needs the {module} package, which is not installed ({exc}): "
            f"pip install 'olmo_fn[{extra}]'"
        ) from None


def check_logging_options(log: LogConfig, profile: ProfileConfig, steps: int) -> None:
    """What can be checked before a run writes anything: the optional packages asked for, and a
    profiled range inside the run."""
    if log.wandb:
        require_module("wandb", "--log.wandb", "wandb")
    if log.tensorboard:
        require_module("tensorboard", "--log.tensorboard", "tensorboard")
    if profile.range is not None and profile.range[1] > steps:
        raise ConfigError(f"profile.steps={profile.steps} ends after the run's last step (steps={steps})")
