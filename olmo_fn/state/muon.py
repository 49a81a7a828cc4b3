"""Functional Muon: orthogonalised momentum for the blocks' matrices, AdamW for every other leaf.

Muon leaves (`is_muon_matrix`): the 2-D matrices under ``blocks.`` (attention and feed-forward
projections). Per Muon matrix ``p`` of shape ``(A, B)`` with gradient ``g`` and momentum ``m``::

    m = momentum * m + (1 - momentum) * g
    u = (1 - momentum) * g + momentum * m       (nesterov; otherwise u = m)
    o = orthogonalise(u)                         (quintic Newton–Schulz, see `orthogonalise`)
    p *= 1 - lr * weight_decay                   (decaying paths only; the unadjusted lr)
    p -= adjusted_lr * o

with ``adjusted_lr = lr * sqrt(max(1, A / B))`` (``adjust_lr="original"``) or
``lr * 0.2 * sqrt(max(A, B))`` (``"match_rms_adamw"``: the update's RMS then matches AdamW's, so
AdamW's learning rate and weight decay carry over). This is the arithmetic of ``torch.optim.Muon``.
Every other leaf (embeddings, norms, the LM head) gets the AdamW update of `olmo_fn.state.adamw`,
with its own learning rate, betas, eps and weight decay.

State layout: a TensorDict with three subtrees that use the parameters' dotted paths and together
cover every parameter exactly once::

    momentum      over the Muon matrices only
    exp_avg       over the AdamW leaves only
    exp_avg_sq    over the AdamW leaves only

No leaf carries a buffer it does not use, and each subtree is a plain tree of parameter-shaped
tensors (in at least fp32), so it is sharded, checkpointed and resharded like the parameters.

Sharding: `orthogonalise` needs the whole matrix (its Frobenius norm and ``X Xᵀ`` span every
entry), and `muon_update` only sees plain local tensors. Under FSDP or tensor parallelism the
caller must hand it whole (gathered) Muon matrices and gradients; on shards it would silently
orthogonalise each shard on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from tensordict import TensorDict

from olmo_fn.errors import ConfigError
from olmo_fn.graph.param_tree import flatten, unflatten
from olmo_fn.state.adamw import _foreach as _adamw_foreach
from olmo_fn.state.adamw import zero_moment
from olmo_fn.state.optim_config import OptimConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Quintic Newton–Schulz coefficients ``(a, b, c)``, chosen for a steep slope at zero."""


def is_muon_matrix(path: str, t: torch.Tensor) -> bool:
    """Whether the leaf at dotted `path` is a 2-D block matrix, optimised by Muon (else by AdamW)."""
    return path.startswith("blocks.") and t.ndim == 2


def orthogonalise(
    g: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximately orthogonalise the 2-D matrix `g` (its ``U S Vᵀ`` -> about ``U Vᵀ``).

    Casts to `compute_dtype`, divides by ``max(‖g‖_F, eps)`` (so every singular value is <= 1),
    works on the wide orientation (transposed when rows > cols, so ``A`` is the smaller Gram
    matrix), runs `steps` iterations of ``X <- a X + (b A + c A²) X`` with ``A = X Xᵀ``, and
    transposes back. The quintic's coefficients trade exactness for speed: singular values end up
    spread around 1 (about [0.7, 1.2]), not equal to 1. Returns `g`'s shape and dtype; `g` itself
    is not modified. ``compute_dtype=torch.bfloat16`` is what ``torch.optim.Muon`` uses.
    """
    if g.ndim != 2:
        raise ValueError(f"orthogonalise needs a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    tall = g.shape[0] > g.shape[1]
    x = g.to(compute_dtype)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A²
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A²) X
    if tall:
        x = x.mT
    return x.to(g.dtype)


def adjusted_lr(
    lr: float, shape: tuple[int, ...], adjust_lr: Literal["original", "match_rms_adamw"]
) -> float:
    """Learning rate for a Muon matrix of `shape` ``(A, B)`` (``(out, in)``)."""
    rows, cols = shape[0], shape[1]
    if adjust_lr == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ConfigError(f"adjust_lr={adjust_lr!r} must be 'original' or 'match_rms_adamw'")


def init_muon_state(params: TensorDict) -> TensorDict:
    """Zero buffers in at least fp32: ``momentum`` over Muon matrices, ``exp_avg`` and ``exp_avg_sq``
    over every other leaf (see the module docstring for the layout)."""
    muon: dict[str, torch.Tensor] = {}
    adamw: dict[str, torch.Tensor] = {}
    for path, t in flatten(params).items():
        (muon if is_muon_matrix(path, t) else adamw)[path] = zero_moment(t)
    return TensorDict(
        {
            "momentum": unflatten(muon),
            "exp_avg": unflatten(adamw),
            "exp_avg_sq": unflatten({k: v.clone() for k, v in adamw.items()}),
        },
        batch_size=[],
    )


@torch.no_grad()
def muon_update(
    params: TensorDict,
    grads: dict[str, torch.Tensor],
    opt_state: TensorDict,
    *,
    step: int,
    lr: float,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    ns_eps: float = 1e-7,
    ns_dtype: torch.dtype = torch.bfloat16,
    weight_decay: float,
    adjust_lr: Literal["original", "match_rms_adamw"] = "match_rms_adamw",
    adamw_lr: float,
    adamw_betas: tuple[float, float],
    adamw_eps: float,
    adamw_weight_decay: float,
    decays: Callable[[str], bool],
) -> tuple[TensorDict, TensorDict]:
    """Apply update number `step` (1-based; AdamW's bias correction) to every leaf, in place.

    lr / adamw_lr: the Muon and AdamW learning rates, both already scaled by the schedule.
    weight_decay / adamw_weight_decay: decoupled weight decay of each side, applied only where
    `decays(path)`. grads: dotted path -> gradient, for every parameter (any float dtype; it is cast
    to its buffer's dtype). Which leaves are Muon's is read off `opt_state` (its ``momentum``
    subtree), as `init_muon_state` laid it out. Returns ``(params, opt_state)``: the same tensors,
    updated in place.
    """
    problems = []
    if step < 1:
        problems.append(f"step={step!r} must be >= 1 (it is 1-based)")
    if not 0 <= lr < math.inf:
        problems.append(f"lr={lr!r} must be finite and >= 0")
    if not 0 <= momentum < 1:
        problems.append(f"momentum={momentum!r} must be in [0, 1)")
    if ns_steps < 1:
        problems.append(f"ns_steps={ns_steps!r} must be >= 1")
    if not 0 <= weight_decay < math.inf:
        problems.append(f"weight_decay={weight_decay!r} must be finite and >= 0")
    if adjust_lr not in ("original", "match_rms_adamw"):
        problems.append(f"adjust_lr={adjust_lr!r} must be 'original' or 'match_rms_adamw'")
    if problems:
        raise ConfigError("invalid Muon hyper-parameters: " + "; ".join(problems))
    # Validates the AdamW side's values (raises ConfigError) and carries them to its arithmetic.
    adamw_cfg = OptimConfig(
        lr=adamw_lr,
        beta1=adamw_betas[0],
        beta2=adamw_betas[1],
        eps=adamw_eps,
        weight_decay=adamw_weight_decay,
    )

    flat_p = flatten(params)
    flat_b = flatten(opt_state["momentum"])
    flat_m = flatten(opt_state["exp_avg"])
    flat_v = flatten(opt_state["exp_avg_sq"])
    if (
        flat_b.keys() & flat_m.keys()
        or flat_p.keys() != flat_b.keys() | flat_m.keys()
        or flat_m.keys() != flat_v.keys()
    ):
        raise KeyError("Muon state does not cover each parameter exactly once; build it with init_muon_state")

    for decay in (True, False):
        paths = [k for k in flat_b if bool(decays(k)) == decay]
        if paths:
            _muon_group(
                [flat_p[k] for k in paths],
                [grads[k].to(flat_b[k].dtype) for k in paths],
                [flat_b[k] for k in paths],
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                ns_coefficients=ns_coefficients,
                ns_eps=ns_eps,
                ns_dtype=ns_dtype,
                weight_decay=weight_decay if decay else 0.0,
                adjust_lr=adjust_lr,
            )
        paths = [k for k in flat_m if bool(decays(k)) == decay]
        if paths:
            _adamw_foreach(
                [flat_p[k] for k in paths],
                [grads[k].to(flat_m[k].dtype) for k in paths],
                [flat_m[k] for k in paths],
                [flat_v[k] for k in paths],
                step=step,
                lr=adamw_lr,
                weight_decay=adamw_weight_decay if decay else 0.0,
                cfg=adamw_cfg,
            )
    return params, opt_state


def _muon_group(
    p, g, buf, *, lr, momentum, nesterov, ns_steps, ns_coefficients, ns_eps, ns_dtype, weight_decay, adjust_lr
):
    torch._foreach_lerp_(buf, g, 1 - momentum)
    directions = torch._foreach_lerp(g, buf, momentum) if nesterov else buf
    if weight_decay:
        torch._foreach_mul_(p, 1 - lr * weight_decay)
    for param, direction in zip(p, directions, strict=True):
        ortho = orthogonalise(direction, ns_steps, ns_coefficients, ns_eps, compute_dtype=ns_dtype)
        param.add_(ortho, alpha=-adjusted_lr(lr, param.shape, adjust_lr))
