"""The optimizer a run uses, chosen by ``OptimConfig.name``: its state and its update.

Each optimizer's state is a TensorDict of named subtrees over the parameters' dotted paths (AdamW:
``exp_avg``, ``exp_avg_sq`` over every leaf; Lion: ``exp_avg``; Muon: ``momentum`` over the blocks'
matrices, ``exp_avg`` and ``exp_avg_sq`` over the other leaves), so it is sharded, checkpointed and
resharded like the parameters. A checkpoint's config names the optimizer whose state it holds.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from olmo_fn.graph.param_tree import flatten, unflatten
from olmo_fn.state.adamw import adamw_update, decays, init_adamw_state, zero_moment
from olmo_fn.state.lion import init_lion_state, lion_update
from olmo_fn.state.muon import init_muon_state, muon_update
from olmo_fn.state.optim_config import OptimConfig


def init_opt_state(params: TensorDict, cfg: OptimConfig) -> TensorDict:
    """Zero optimizer state for `params` (in at least fp32, placed like them)."""
    if cfg.name == "lion":
        return init_lion_state(params)
    if cfg.name == "muon":
        return init_muon_state(params)
    return init_adamw_state(params)


def zeros_like_state(opt_state: TensorDict, params: TensorDict) -> TensorDict:
    """A zero state with `opt_state`'s layout, for `params` (placed like them): each subtree covers
    the same paths it covers in `opt_state`, restricted to those `params` holds."""
    flat = flatten(params)
    return TensorDict(
        {
            name: unflatten({p: zero_moment(flat[p]) for p in flatten(opt_state[name]) if p in flat})
            for name in opt_state.keys()  # noqa: SIM118 (a TensorDict iterates only through keys())
        },
        batch_size=[],
    )


@torch.no_grad()
def optimizer_update(
    params: TensorDict,
    grads: dict[str, torch.Tensor],
    opt_state: TensorDict,
    *,
    step: int,
    lr: float,
    cfg: OptimConfig,
) -> tuple[TensorDict, TensorDict]:
    """Apply update number `step` (1-based) with learning rate `lr` (the schedule's) in place.

    grads: dotted path -> gradient, for every parameter. Muon needs whole matrices: under a plan its
    callers pass the placed (DTensor) trees, whose operations span the shards."""
    if cfg.name == "lion":
        return lion_update(
            params,
            grads,
            opt_state,
            lr=lr,
            beta1=cfg.beta1,
            beta2=cfg.lion_beta2,
            weight_decay=cfg.weight_decay,
            decays=lambda path: decays(path, cfg),
        )
    if cfg.name == "muon":
        return muon_update(
            params,
            grads,
            opt_state,
            step=step,
            lr=lr,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            ns_steps=cfg.muon_ns_steps,
            ns_dtype=getattr(torch, cfg.muon_ns_dtype),
            weight_decay=cfg.weight_decay,
            adjust_lr=cfg.muon_adjust_lr,
            adamw_lr=lr,
            adamw_betas=(cfg.beta1, cfg.beta2),
            adamw_eps=cfg.eps,
            adamw_weight_decay=cfg.weight_decay,
            decays=lambda path: decays(path, cfg),
        )
    return adamw_update(params, grads, opt_state, step=step, lr=lr, cfg=cfg)
