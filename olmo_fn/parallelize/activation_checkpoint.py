"""Activation checkpointing policies: what a block keeps for backward and what it recomputes.

Each policy is a pure wrapper around a block function (same signature), so it composes with
compilation, FlexAttention masks and the placement plans' gathering blocks:

- ``none``: autograd keeps every intermediate it needs;
- ``full``: only the block's inputs are kept; the whole block runs again in backward;
- ``selective``: the outputs of matmuls and attention are kept, everything else (norms, RoPE,
  activations, casts, parameter gathers) is recomputed;
- ``budget``: torch.compile's min-cut partitioner decides, keeping at most a fraction
  (``ac_budget``) of the activations that ``none`` keeps; needs compilation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from olmo_fn.graph.model import BlockFn

ActivationCheckpointing = Literal["none", "full", "selective", "budget"]

_SAVED_OPS = frozenset(
    op
    for name in (
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    if (op := getattr(getattr(torch.ops.aten, name, None), "default", None)) is not None
)
"""Ops whose outputs the selective policy keeps: the expensive ones, whose outputs are new tensors
(never views of a gathered weight)."""


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _save_matmul_outputs():
    return create_selective_checkpoint_contexts(_policy)


def checkpointed_block(block_fn: BlockFn, policy: ActivationCheckpointing) -> BlockFn:
    """`block_fn` under activation checkpointing `policy`; ``none`` and ``budget`` return it unchanged
    (the budget is applied where the block is compiled, see `olmo_fn.parallelize.compile`)."""
    if policy in ("none", "budget"):
        return block_fn
    if policy == "full":

        def full(p, x, rope, mask, cfg):
            return checkpoint(block_fn, p, x, rope, mask, cfg, use_reentrant=False)

        return full
    if policy == "selective":

        def selective(p, x, rope, mask, cfg):
            return checkpoint(
                block_fn, p, x, rope, mask, cfg, use_reentrant=False, context_fn=_save_matmul_outputs
            )

        return selective
    raise ValueError(f"unknown activation checkpointing policy {policy!r}")


def checkpointing_problems(ac: str, ac_budget: float, pp_schedule: str | None) -> list[str]:
    """Why the policy `ac` cannot run as configured, each naming the field and value (empty if it
    can). pp_schedule: the pipeline schedule under pipeline parallelism, else None."""
    from olmo_fn.parallelize.parallel_config import ZERO_BUBBLE_SCHEDULES

    problems = []
    if ac not in ("none", "full", "selective", "budget"):
        problems.append(f"ac={ac!r} must be none, full, selective or budget")
    if ac == "budget" and not 0 < ac_budget <= 1:
        problems.append(f"ac_budget={ac_budget} must be in (0, 1] (the share of activations kept)")
    if ac not in ("none", "budget") and pp_schedule in ZERO_BUBBLE_SCHEDULES:
        problems.append(
            f"ac={ac} cannot run under parallel.pp_schedule={pp_schedule}: zero-bubble schedules split a "
            "block's backward in two, which recomputation does not allow (use --ac none or another schedule)"
        )
    return problems
