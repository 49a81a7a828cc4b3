"""Gathering stored (sharded) parameters into their compute layout: an explicit, differentiable step.

`to_compute` is the SimpleFSDP idea as a function: forward casts a stored DTensor to the compute
dtype and all-gathers it over the data-parallel axes (keeping the tensor-parallel shard), returning a
plain local tensor the model functions use unchanged; backward takes that tensor's gradient to the
reduce dtype and reduce-scatters it back to the stored placements (summing over data-parallel ranks,
and over tensor-parallel ranks where the plan says the gradient is partial there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from olmo_fn.parallelize.plan import Plan, Rule


class _ToCompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stored: DTensor, rule: Rule, compute_dtype: torch.dtype, reduce_dtype: torch.dtype):
        ctx.mesh, ctx.rule, ctx.reduce_dtype = stored.device_mesh, rule, reduce_dtype
        ctx.stored_placements, ctx.stored_dtype = stored.placements, stored.dtype
        cast = stored.to(compute_dtype) if stored.dtype != compute_dtype else stored
        return cast.redistribute(stored.device_mesh, rule.compute_placements).to_local()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        partial = DTensor.from_local(
            grad.to(ctx.reduce_dtype), ctx.mesh, ctx.rule.grad_placements, run_check=False
        )
        reduced = partial.redistribute(ctx.mesh, ctx.stored_placements)
        return reduced.to(ctx.stored_dtype), None, None, None


def to_compute(stored: DTensor, rule: Rule, plan: Plan) -> torch.Tensor:
    """The local compute-layout tensor of a stored parameter (see the module docstring)."""
    return _ToCompute.apply(stored, rule, plan.compute_dtype, plan.reduce_dtype)


def tree_to_compute(tree: Mapping[str, Any], prefix: str, plan: Plan, rules: Mapping[str, Rule]) -> dict:
    """`to_compute` over a (nested) subtree whose dotted paths start with `prefix`; returns plain dicts."""
    out: dict[str, Any] = {}
    for key in tree.keys():  # noqa: SIM118 (a TensorDict iterates only through keys())
        value = tree[key]
        path = f"{prefix}{key}"
        if isinstance(value, DTensor):
            out[key] = to_compute(value, rules[path], plan)
        else:
            out[key] = tree_to_compute(value, f"{path}.", plan, rules)
    return out
