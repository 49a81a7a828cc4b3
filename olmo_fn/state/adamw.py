"""Functional AdamW (decoupled weight decay) over the leaves of a parameter tree.

`adamw_update` has the arithmetic of ``torch.optim.AdamW``; it runs as ``torch._foreach_*`` kernels
or as the fused ``torch._fused_adamw_`` kernel, one call per weight-decay group. It updates the
parameter and moment buffers in place and returns them: callers treat the inputs as consumed.
"""

from __future__ import annotations

import fnmatch

import torch
from tensordict import TensorDict

from olmo_fn.graph.param_tree import flatten
from olmo_fn.state.optim_config import OptimConfig


def zero_moment(t: torch.Tensor) -> torch.Tensor:
    """A zero optimizer buffer shaped and placed like parameter `t`, in at least fp32."""
    return torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32), requires_grad=False)


def init_adamw_state(params: TensorDict) -> TensorDict:
    """Zero first and second moments, shaped and placed like the parameters, in at least fp32."""
    zeros = params.apply(zero_moment)
    return TensorDict({"exp_avg": zeros, "exp_avg_sq": zeros.clone()}, batch_size=[])


def decays(path: str, cfg: OptimConfig) -> bool:
    """Whether the parameter at dotted `path` gets weight decay."""
    return not any(fnmatch.fnmatchcase(path, pattern) for pattern in cfg.no_decay)


@torch.no_grad()
def adamw_update(
    params: TensorDict,
    grads: dict[str, torch.Tensor],
    opt_state: TensorDict,
    *,
    step: int,
    lr: float,
    cfg: OptimConfig,
) -> tuple[TensorDict, TensorDict]:
    """Apply AdamW update number `step` (1-based, for bias correction) with learning rate `lr`.

    grads: dotted path -> gradient, for every parameter. Returns ``(params, opt_state)``: the same
    tensors, updated in place.
    """
    flat_p = flatten(params)
    flat_m = flatten(opt_state["exp_avg"])
    flat_v = flatten(opt_state["exp_avg_sq"])
    groups: dict[bool, list[str]] = {True: [], False: []}
    for path in flat_p:
        groups[decays(path, cfg)].append(path)
    for decay, paths in groups.items():
        if not paths:
            continue
        update = _fused if cfg.implementation == "fused" else _foreach
        update(
            [flat_p[k] for k in paths],
            [grads[k] for k in paths],
            [flat_m[k] for k in paths],
            [flat_v[k] for k in paths],
            step=step,
            lr=lr,
            weight_decay=cfg.weight_decay if decay else 0.0,
            cfg=cfg,
        )
    return params, opt_state


def _foreach(p, g, m, v, *, step, lr, weight_decay, cfg):
    bias1 = 1 - cfg.beta1**step
    bias2_sqrt = (1 - cfg.beta2**step) ** 0.5
    if weight_decay:
        torch._foreach_mul_(p, 1 - lr * weight_decay)
    torch._foreach_lerp_(m, g, 1 - cfg.beta1)
    torch._foreach_mul_(v, cfg.beta2)
    torch._foreach_addcmul_(v, g, g, 1 - cfg.beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, cfg.eps)
    torch._foreach_addcdiv_(p, m, denom, -lr / bias1)


def _fused(p, g, m, v, *, step, lr, weight_decay, cfg):
    steps = [torch.tensor(float(step), device=t.device) for t in p]
    torch._fused_adamw_(
        p,
        g,
        m,
        v,
        [],
        steps,
        lr=lr,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        weight_decay=weight_decay,
        eps=cfg.eps,
        amsgrad=False,
        maximize=False,
    )
