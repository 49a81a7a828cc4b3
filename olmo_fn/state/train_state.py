"""`TrainState`: everything a run needs to continue, as one frozen record."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict

import olmo_fn
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.init import empty_params, init_params
from olmo_fn.state.optim import init_opt_state
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.spikes import SpikeWindow

ADAMW = OptimConfig()


def current_versions() -> dict[str, str]:
    """Versions of the software that computes and writes states."""
    return {"olmo_fn": olmo_fn.__version__, "torch": torch.__version__}


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The state of a run after `step` optimizer updates.

    params: fp32 master parameters (leaves require grad). opt_state: the optimizer's named trees
    over the parameters' paths (`olmo_fn.state.optim`). data_cursor: instances of the data order
    consumed so far (the next batch starts there). config: the run's configuration as JSON-ready
    data, with its fingerprint over the fields that change the training math. versions: the
    software that produced the state. Randomness derives from ``(seed, step, rank)``, so no RNG state is kept.
    """

    step: int
    params: TensorDict
    opt_state: TensorDict
    data_cursor: int
    tokens_seen: int
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config_fingerprint: str = ""
    versions: Mapping[str, str] = dataclasses.field(default_factory=current_versions)
    spikes: SpikeWindow = SpikeWindow()
    """The recent losses and gradient norms spike detection compares a step with (`olmo_fn.state.spikes`)."""


def init_train_state(
    cfg: ModelConfig,
    *,
    seed: int,
    device: torch.device | str,
    config: Mapping[str, Any] | None = None,
    config_fingerprint: str = "",
    optim: OptimConfig = ADAMW,
) -> TrainState:
    """Step 0: freshly initialised fp32 parameters and `optim`'s zero state."""
    params = init_params(cfg, seed=seed, device=device, dtype=torch.float32)
    params.apply_(lambda t: t.requires_grad_(True))
    return TrainState(
        step=0,
        params=params,
        opt_state=init_opt_state(params, optim),
        data_cursor=0,
        tokens_seen=0,
        config=dict(config or {}),
        config_fingerprint=config_fingerprint,
    )


def empty_train_state(
    cfg: ModelConfig,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    optim: OptimConfig = ADAMW,
) -> TrainState:
    """A state with uninitialised buffers of the right shapes (`optim`'s state layout): the template a
    checkpoint loads into."""
    params = empty_params(cfg, device=device, dtype=dtype)
    params.apply_(lambda t: t.requires_grad_(True))
    return TrainState(0, params, init_opt_state(params, optim), 0, 0)
