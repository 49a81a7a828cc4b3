"""`Gradients`: what one batch's backward yields, however it was computed (one process, a plan, a
pipeline)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from tensordict import TensorDict

from olmo_fn.io.batch import Batch


@dataclasses.dataclass(frozen=True)
class Gradients:
    """The gradients of one batch's objective, and the sums its metrics come from (over all ranks)."""

    grads: dict[str, torch.Tensor]
    """Dotted path -> gradient, placed like its parameter (DTensors under a sharding)."""
    ce_sum: torch.Tensor
    z_sum: torch.Tensor
    n_targets: torch.Tensor
    moe_stats: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """The MoE layers' statistics summed over micro-batches and ranks (`olmo_fn.state.moe_terms`)."""


GradientFn = Callable[[TensorDict, Batch], Gradients]
