"""Gathering stored (sharded) parameters into their compute layout: an explicit, differentiable step.

`to_compute` is the SimpleFSDP idea as one DTensor call: forward casts a stored parameter to the
compute dtype and all-gathers it over the data-parallel axes (keeping its tensor-parallel shard),
giving a plain local tensor the model functions use unchanged; backward takes that tensor's gradient
to the reduce dtype and reduce-scatters it back to the stored placements, summing over data-parallel
ranks (and over tensor-parallel ranks where the plan says the gradient is partial there). Both are
DTensor operations, so a compiled block that gathers its own parameters has the collectives in its
graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from olmo_fn.parallelize.plan import Plan, Rule


def to_compute(stored: DTensor, rule: Rule, plan: Plan) -> torch.Tensor:
    """The local compute-layout tensor of a stored parameter (see the module docstring)."""
    gathered = stored.redistribute(
        stored.device_mesh,
        rule.compute_placements,
        forward_dtype=plan.compute_dtype,
        backward_dtype=plan.reduce_dtype,
    )
    return gathered.to_local(grad_placements=rule.grad_placements)


def tree_to_compute(
    tree: Mapping[str, Any],
    prefix: str,
    plan: Plan,
    rules: Mapping[str, Rule],
    gather: Callable[[str, DTensor, Rule, Plan], Any] | None = None,
) -> dict:
    """`to_compute` over a (nested) subtree whose dotted paths, after `prefix`, are keys of `rules`;
    returns plain dicts. gather: ``gather(path, stored, rule, plan)`` in place of `to_compute` (it may
    return another array type, e.g. a float8 tensor, for the paths it chooses)."""
    out: dict[str, Any] = {}
    for key in tree.keys():  # noqa: SIM118 (a TensorDict iterates only through keys())
        value = tree[key]
        path = f"{prefix}{key}"
        if isinstance(value, DTensor):
            rule = rules[path]
            out[key] = gather(path, value, rule, plan) if gather else to_compute(value, rule, plan)
        else:
            out[key] = tree_to_compute(value, f"{path}.", plan, rules, gather)
    return out
