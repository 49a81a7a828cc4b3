"""Placement plans: data that says where every parameter lives on the mesh, applied by one function.

A plan is an ordered list of `Rule`s: a glob over dotted parameter paths, and a placement on each
placement axis (``dp_replicate``, ``dp_shard``, ``tp``). `apply_plan` turns a tree of full
tensors into the same tree of DTensors; the first rule a path matches decides. A parameter no rule
matches, or a rule that matches no parameter, is an error. The model functions never see a plan:
the train step gathers each block's parameters into their *compute layout* just before the block
runs (`compute_layout`), and the gradients come back to the stored layout.

Compute layout: replicated over the data-parallel and context-parallel axes, and on ``tp`` as stored
(the tensor-parallel shard a rank computes with). Gradient layout, before it is reduced to the stored
layout: partial sums over the data-parallel and context-parallel axes (each rank saw other data, or
other positions of the same sequences); on ``tp`` the stored shard, or partial sums for a parameter
replicated on ``tp`` (a norm weight, applied to this rank's slice of the sequence).

Context-parallel ranks shard parameters like data-parallel shards do: the ``dp_shard`` placement axis
spans ``dp_shard × cp`` (FSDP over both; their gradients are partial sums alike). Pipeline stages are not a
placement: each stage's ranks place only the parameters of the layers it runs (`stage_plan`).

Expert parallelism: a rule with an ``ep`` placement places on the expert mesh (`EXPERT_AXES`:
``dp_replicate × dp_shard / ep × ep × tp``). The experts (``*.feed_forward.experts.*``, stacked on dim 0)
are stored Shard(0) over ``ep`` (each ep rank its n_experts / ep experts) and Shard(1) over the other
``dp_shard / ep`` ranks (FSDP within the experts' replicas); their compute layout is gathered over
``dp_shard / ep`` and keeps Shard(0) over ``ep``: a rank computes only its own experts, for every ep
rank's tokens (`olmo_fn.parallelize.expert_parallel`). Their gradient is therefore complete over ``ep``
(Shard(0): the all-to-all's backward brought every ep rank's contributions to the owner) and partial
over ``dp_replicate`` and ``dp_shard / ep``, the replicas holding the same experts that saw other rows.

For FSDP x TP the data-parallel shard of a tensor-parallel matrix is taken along the *other*
dimension (rows for TP's columns), so gathering over ``dp_shard`` yields exactly the TP shard.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping

import torch
from tensordict import TensorDict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Placement, Replicate, Shard, distribute_tensor

from olmo_fn.errors import ConfigError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import flatten, param_shapes, unflatten
from olmo_fn.parallelize.parallel_config import AXES, EXPERT_AXES, MeshShape


@dataclasses.dataclass(frozen=True)
class Rule:
    """Parameters whose dotted path matches `pattern` are stored with these placements; with an `ep`
    placement, on the expert mesh (`EXPERT_AXES`, where `dp_shard` is over dp_shard / ep ranks)."""

    pattern: str
    dp_shard: Placement = Replicate()
    tp: Placement = Replicate()
    dp_replicate: Placement = Replicate()
    ep: Placement | None = None

    @property
    def axes(self) -> tuple[str, ...]:
        """The placement axes: `AXES`, or `EXPERT_AXES` for an expert-parallel rule."""
        return AXES if self.ep is None else EXPERT_AXES

    def _per_axis(self, dp_replicate: Placement, dp_shard: Placement, tp: Placement) -> tuple[Placement, ...]:
        """One placement per axis of `axes`: the given ones, with the stored ``ep`` placement."""
        return (dp_replicate, dp_shard, tp) if self.ep is None else (dp_replicate, dp_shard, self.ep, tp)

    @property
    def placements(self) -> tuple[Placement, ...]:
        """Stored placements, one per axis of `axes`."""
        return self._per_axis(self.dp_replicate, self.dp_shard, self.tp)

    @property
    def compute_placements(self) -> tuple[Placement, ...]:
        """Replicated over the data-parallel axes; on ``ep`` and ``tp`` as stored."""
        return self._per_axis(Replicate(), Replicate(), self.tp)

    @property
    def grad_placements(self) -> tuple[Placement, ...]:
        """Partial over the data-parallel axes; on ``ep`` as stored (the owner's gradient is whole);
        on ``tp`` the stored shard, else partial."""
        return self._per_axis(Partial(), Partial(), self.tp if isinstance(self.tp, Shard) else Partial())

    def axis_sizes(self, shape: MeshShape) -> tuple[int, ...]:
        """The size of each of `axes` on `shape`."""
        return shape.sizes if self.ep is None else shape.expert_sizes


@dataclasses.dataclass(frozen=True)
class Plan:
    """Rules plus the mixed-precision policy: parameters are gathered in `compute_dtype`, gradients
    reduced in `reduce_dtype` (the fp32 masters and moments stay as stored)."""

    rules: tuple[Rule, ...]
    compute_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32

    def rule_for(self, path: str) -> Rule:
        for rule in self.rules:
            if fnmatch.fnmatchcase(path, rule.pattern):
                return rule
        raise ConfigError(f"plan: no rule places parameter {path!r}")

    def for_paths(self, paths: list[str]) -> Plan:
        """The plan without the rules that match none of `paths` (e.g. a pipeline stage's parameters)."""
        chosen = {self.rule_for(path) for path in paths}
        return dataclasses.replace(self, rules=tuple(r for r in self.rules if r in chosen))

    def rules_by_path(self, paths: list[str]) -> dict[str, Rule]:
        """The rule of every path; an error for a path no rule matches or a rule that matches none."""
        chosen = {path: self.rule_for(path) for path in paths}
        unused = [r.pattern for r in self.rules if r not in chosen.values()]
        if unused:
            raise ConfigError(f"plan: rule(s) {', '.join(map(repr, unused))} match no parameter")
        return chosen


# Parameters split by tensor parallelism, by the matmul they feed.
COLUMN_WISE = (
    "*.attention.w_q",
    "*.attention.w_k",
    "*.attention.w_v",
    "*.feed_forward.w1",
    "*.feed_forward.w3",
)
"""Split by output rows: each tp rank computes some heads / hidden units."""
ROW_WISE = ("*.attention.w_out", "*.feed_forward.w2")
"""Split by input columns: each tp rank contributes a partial sum of the output."""
HEAD_NORMS = ("*.attention.q_norm", "*.attention.k_norm")
"""QK-norm weights, split like the heads they scale (the norm's statistics still span all heads)."""
VOCAB = ("embeddings", "lm_head.w_out")
"""Split by vocabulary rows (vocabulary-parallel embedding and loss)."""
EXPERTS = "*.feed_forward.experts.*"
"""The stacked experts of MoE layers, (n_experts, ...): split by expert over ``ep``."""


def default_plan(model: ModelConfig, shape: MeshShape, *, compute_dtype: torch.dtype = torch.float32) -> Plan:
    """FSDP / HSDP over the data-parallel axes, and TP + sequence parallel over ``tp``; gradients are
    reduced in at least fp32.

    Every parameter is sharded over ``dp_shard × cp`` (dim 0, or dim 1 where ``tp`` already splits
    dim 0) and replicated over ``dp_replicate``; under expert parallelism the experts are split by
    expert over ``ep`` and by dim 1 over the other dp_shard / ep ranks. Rules are listed only for
    parameters `model` has.
    """
    tp = shape.tp > 1
    rules = []
    if shape.ep > 1:
        rules.append(Rule(EXPERTS, dp_shard=Shard(1), ep=Shard(0)))
    if tp:
        rules += [Rule(p, dp_shard=Shard(1), tp=Shard(0)) for p in COLUMN_WISE]
        rules += [Rule(p, dp_shard=Shard(0), tp=Shard(1)) for p in ROW_WISE]
        if model.qk_norm and model.qk_norm_scope == "all_heads":  # per head: one (d_head,) for all heads
            rules += [Rule(p, dp_shard=Replicate(), tp=Shard(0)) for p in HEAD_NORMS]
        rules += [Rule(p, dp_shard=Shard(1), tp=Shard(0)) for p in VOCAB if p in param_shapes(model)]
    rules.append(Rule("*", dp_shard=Shard(0)))
    reduce_dtype = torch.promote_types(compute_dtype, torch.float32)
    return Plan(tuple(rules), compute_dtype=compute_dtype, reduce_dtype=reduce_dtype)


def apply_plan(
    params: TensorDict | Mapping, plan: Plan, mesh: DeviceMesh, expert_mesh: DeviceMesh | None = None
) -> TensorDict:
    """The same tree with every leaf a DTensor placed as its rule says (leaves keep requires_grad):
    on `mesh`, or for an expert-parallel rule on `expert_mesh` (`olmo_fn.parallelize.mesh.Layout`).

    Every process must pass the same full values (olmo_fn's init is deterministic per path, and a
    template's values do not matter); each keeps only its shard, without communication.
    """
    flat = flatten(params)
    rules = plan.rules_by_path(list(flat))
    placed = {}
    for path, tensor in flat.items():
        rule = rules[path]
        on = mesh if rule.ep is None else expert_mesh
        if on is None:
            raise ConfigError(f"plan: {path} is placed over ep, but no expert mesh was given")
        dtensor = distribute_tensor(tensor.detach(), on, rule.placements, src_data_rank=None)
        placed[path] = dtensor.requires_grad_(tensor.requires_grad)
    return unflatten(placed)


def _show(placement: Placement) -> str:
    if isinstance(placement, Shard):
        return f"shard({placement.dim})"
    return "partial" if isinstance(placement, Partial) else "replicate"


def plan_table(plan: Plan, model: ModelConfig, shape: MeshShape) -> str:
    """The plan as a text table: each rule, its placement per axis, and how many parameters it places.

    Under expert parallelism an ``ep`` column shows the expert rules' split (``-`` for the others,
    whose dp_shard spans the ep ranks), and a line per expert rule its stored, compute and gradient
    placements on `EXPERT_AXES`."""
    rules = plan.rules_by_path(list(param_shapes(model)))
    counts = {rule: sum(1 for r in rules.values() if r == rule) for rule in plan.rules}
    axes = [axis if axis != "dp_shard" or shape.cp == 1 else "dp_shard x cp" for axis in AXES]
    sizes = list(shape.sizes)
    if shape.ep > 1:
        axes.insert(2, "ep")
        sizes.insert(2, shape.ep)

    def cells(rule: Rule) -> tuple[str, ...]:
        shown = [_show(p) for p in rule.placements]
        if shape.ep > 1 and rule.ep is None:
            shown.insert(2, "-")
        elif rule.ep is not None:
            shown[1] += f" over {shape.expert_sizes[1]}"
        return tuple(shown)

    header = ("rule", *(f"{axis} ({size})" for axis, size in zip(axes, sizes, strict=True)), "params")
    rows = [header] + [(rule.pattern, *cells(rule), str(counts[rule])) for rule in plan.rules]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    dtypes = f"compute {str(plan.compute_dtype).removeprefix('torch.')}, "
    dtypes += f"gradient reduction {str(plan.reduce_dtype).removeprefix('torch.')}"
    lines.append(dtypes)
    if shape.ep > 1:
        replicas = shape.expert_sizes[1]
        lines += [
            f"expert parallel: ep {shape.ep} of the dp_shard {shape.dp_shard} ranks hold different experts; "
            f"an expert rule's dp_shard is over the dp_shard / ep = {replicas} ranks holding the same ones",
            "placements per axis (dp_replicate, dp_shard / ep, ep, tp):",
        ]
        show = lambda placements: ", ".join(map(_show, placements))  # noqa: E731
        for rule in plan.rules:
            if rule.ep is not None:
                lines += [
                    f"  {rule.pattern}",
                    f"    stored    {show(rule.placements)}",
                    f"    compute   {show(rule.compute_placements)}   (each ep rank its own experts)",
                    f"    gradient  {show(rule.grad_placements)}   (summed over the replicas of each expert)",
                ]
    return "\n".join(lines)
