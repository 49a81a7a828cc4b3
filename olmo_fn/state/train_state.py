"""`TrainState`: everything a run needs to continue, as one frozen record."""

from __future__ import annotations

import dataclasses

import torch
from tensordict import TensorDict

from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.init import init_params
from olmo_fn.state.adamw import init_adamw_state


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The state of a run after `step` optimizer updates.

    params: fp32 master parameters (leaves require grad). opt_state: ``exp_avg`` and ``exp_avg_sq``
    trees mirroring params. data_cursor: instances of the data order consumed so far (the next batch
    starts there). Randomness derives from ``(seed, step, rank)``, so no RNG state is kept.
    """

    step: int
    params: TensorDict
    opt_state: TensorDict
    data_cursor: int
    tokens_seen: int
    config_fingerprint: str


def init_train_state(
    cfg: ModelConfig, *, seed: int, device: torch.device | str, config_fingerprint: str = ""
) -> TrainState:
    """Step 0: freshly initialised fp32 parameters and zero optimizer moments."""
    params = init_params(cfg, seed=seed, device=device, dtype=torch.float32)
    params.apply_(lambda t: t.requires_grad_(True))
    return TrainState(
        step=0,
        params=params,
        opt_state=init_adamw_state(params),
        data_cursor=0,
        tokens_seen=0,
        config_fingerprint=config_fingerprint,
    )
