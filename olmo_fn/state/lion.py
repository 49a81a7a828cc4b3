"""Functional Lion (sign momentum, decoupled weight decay) over the leaves of a parameter tree.

Per leaf, with gradient ``g``, momentum ``m``, learning rate ``lr`` and weight decay ``wd``::

    c = beta1 * m + (1 - beta1) * g
    p *= 1 - lr * wd                      (decaying paths only)
    p -= lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

The update runs as ``torch._foreach_*`` kernels, one set per weight-decay group. It updates the
parameters and the momentum in place and returns them: callers treat the inputs as consumed. Lion
has no bias correction, so it needs no step count. Every entry of ``sign(c)`` is -1, 0 or 1, so
its learning rate is usually 3-10x smaller than AdamW's and its weight decay as much larger.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tensordict import TensorDict

from olmo_fn.errors import ConfigError
from olmo_fn.graph.param_tree import flatten
from olmo_fn.state.adamw import zero_moment


def init_lion_state(params: TensorDict) -> TensorDict:
    """``{"exp_avg": zeros}`` shaped and placed like the parameters, in at least fp32."""
    return TensorDict({"exp_avg": params.apply(zero_moment)}, batch_size=[])


@torch.no_grad()
def lion_update(
    params: TensorDict,
    grads: dict[str, torch.Tensor],
    opt_state: TensorDict,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    decays: Callable[[str], bool],
) -> tuple[TensorDict, TensorDict]:
    """Apply one Lion update with learning rate `lr` (already scaled by the schedule).

    grads: dotted path -> gradient, for every parameter (any float dtype; it is cast to the
    momentum's dtype). decays: whether the parameter at a dotted path gets weight decay. Returns
    ``(params, opt_state)``: the same tensors, updated in place.
    """
    _check(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    flat_p = flatten(params)
    flat_m = flatten(opt_state["exp_avg"])
    if flat_p.keys() != flat_m.keys():
        raise KeyError(
            f"Lion state paths differ from the parameters': {sorted(flat_p.keys() ^ flat_m.keys())}"
        )
    groups: dict[bool, list[str]] = {True: [], False: []}
    for path in flat_p:
        groups[bool(decays(path))].append(path)
    for decay, paths in groups.items():
        if not paths:
            continue
        p = [flat_p[k] for k in paths]
        m = [flat_m[k] for k in paths]
        g = [grads[k].to(flat_m[k].dtype) for k in paths]
        direction = torch._foreach_lerp(m, g, 1 - beta1)
        torch._foreach_sign_(direction)
        if decay and weight_decay:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        torch._foreach_add_(p, direction, alpha=-lr)
        torch._foreach_lerp_(m, g, 1 - beta2)
    return params, opt_state


def _check(*, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    problems = []
    if not 0 <= lr < math.inf:
        problems.append(f"lr={lr!r} must be finite and >= 0")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0 <= value < 1:
            problems.append(f"{name}={value!r} must be in [0, 1)")
    if not 0 <= weight_decay < math.inf:
        problems.append(f"weight_decay={weight_decay!r} must be finite and >= 0")
    if problems:
        raise ConfigError("invalid Lion hyper-parameters: " + "; ".join(problems))
