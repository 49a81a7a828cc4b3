"""What a train step does differently when its parameters are placed on a mesh.

`make_train_step` (olmo_fn.state.train_step) is written once; a `Sharding` supplies the few places
where placement matters:

- the model's view of the parameters: each block's stored shards are gathered to their compute
  layout just before the block runs (so about one block's full weights are live at a time; the gather
  is not issued ahead of the block), the embedding and LM head around the blocks;
- sums over the data-parallel ranks (target counts, loss sums for the metrics);
- the global gradient norm, over every shard once;
- the optimizer, which updates each rank's local shards in place (moments are sharded like their
  parameters, so the update is elementwise and needs no communication).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch.distributed.tensor import DTensor, Shard

from olmo_fn.errors import ConfigError
from olmo_fn.graph.model import BlockFn
from olmo_fn.parallelize.activation_checkpoint import ActivationCheckpointing, checkpointed_block
from olmo_fn.parallelize.axis_group import AxisGroup
from olmo_fn.parallelize.compute_layout import to_compute, tree_to_compute
from olmo_fn.parallelize.float8_gather import FLOAT8_GATHERED, float8_gather, gathered_axes
from olmo_fn.parallelize.fp8 import Float8Matmul
from olmo_fn.parallelize.mesh import Layout
from olmo_fn.parallelize.plan import Plan, Rule


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """How the pipeline ranks run their stages: the schedule's name and the stages per rank."""

    schedule: str = "1f1b"
    stages_per_rank: int = 1


@dataclasses.dataclass(frozen=True)
class Sharding:
    """A plan applied on a mesh, with every parameter path's rule looked up once. Under pipeline
    parallelism the paths are this rank's stages' only, and `pipeline` says how stages run."""

    plan: Plan
    layout: Layout
    rules: Mapping[str, Rule]
    pipeline: PipelineSpec | None = None

    @classmethod
    def of(
        cls, plan: Plan, layout: Layout, paths: list[str], pipeline: PipelineSpec | None = None
    ) -> Sharding:
        if pipeline is not None:  # a stage holds some parameters: rules for the others do not apply here
            plan = plan.for_paths(paths)
        return cls(plan, layout, plan.rules_by_path(paths), pipeline)

    @functools.cached_property
    def block_rules(self) -> dict[str, Rule]:
        """The rules of a block by path inside it (the same for every block that has the path: an MoE
        layer's and a dense layer's feed-forwards differ), shared by all blocks: a compiled block
        function then sees the same arguments for every layer and compiles once."""
        inside: dict[str, tuple[str, Rule]] = {}
        for path, rule in self.rules.items():
            if path.startswith("blocks."):
                inner = path.split(".", 2)[2]
                first, seen = inside.setdefault(inner, (path, rule))
                if seen != rule:
                    raise ConfigError(f"plan: {path} is placed unlike {first}")
        return {inner: rule for inner, (_, rule) in inside.items()}

    @functools.cached_property
    def tp(self) -> AxisGroup | None:
        """The tensor-parallel group; None without tensor parallelism."""
        shape = self.layout.shape
        return AxisGroup(self.layout.tp_group, self.layout.tp_rank, shape.tp) if shape.tp > 1 else None

    @functools.cached_property
    def ep(self) -> AxisGroup | None:
        """The expert-parallel group; None without expert parallelism."""
        shape = self.layout.shape
        return AxisGroup(self.layout.ep_group, self.layout.ep_rank, shape.ep) if shape.ep > 1 else None

    @functools.cached_property
    def cp(self) -> AxisGroup | None:
        """The context-parallel group; None without context parallelism."""
        shape = self.layout.shape
        return AxisGroup(self.layout.cp_group, self.layout.cp_rank, shape.cp) if shape.cp > 1 else None


@dataclasses.dataclass(frozen=True)
class StoredBlock:
    """One ``blocks.{i}`` subtree as stored, with the (shared) rules of its parameters; the block
    function gathers it when it runs."""

    tree: Mapping[str, Any]
    rules: Mapping[str, Rule]


def model_view(params: TensorDict, sharding: Sharding) -> dict[str, Any]:
    """What the model functions read: everything outside ``blocks`` in compute layout, and each block
    left stored until `gathering_block` runs it."""
    keys = list(params.keys())  # a TensorDict iterates only through keys()
    view = tree_to_compute({k: params[k] for k in keys if k != "blocks"}, "", sharding.plan, sharding.rules)
    blocks = params["blocks"]
    view["blocks"] = {key: StoredBlock(blocks[key], sharding.block_rules) for key in list(blocks.keys())}
    return view


def gathering_block(
    block_fn: BlockFn,
    sharding: Sharding,
    *,
    checkpointing: ActivationCheckpointing,
    float8: Float8Matmul | None = None,
) -> BlockFn:
    """`block_fn` run on a `StoredBlock`, gathered to its compute layout first, under the activation
    checkpointing policy `checkpointing` applied to gather and block together.

    ``selective`` gives FSDP's reshard-after-forward: the gathered weights are not kept for backward
    (the policy saves the outputs of matmuls and attention and recomputes everything else, the gather
    included), so about one block's full weights are live at a time, at the cost of a second gather per
    block in backward. ``full`` recomputes the gather too; ``none`` keeps the gathered weights.

    float8: a tensorwise float8 configuration whose block matrices are gathered in float8
    (`olmo_fn.parallelize.float8_gather`) where the gather communicates; `block_fn` then gets them as
    float8 tensors (it must multiply them through `olmo_fn.parallelize.fp8.float8_block`).
    """
    gather = None
    if float8 is not None:

        def gather(path, stored, rule, plan):
            if path in FLOAT8_GATHERED and gathered_axes(stored, rule):
                return float8_gather(stored, rule, plan, float8)
            return to_compute(stored, rule, plan)

    def gather_and_run(stored: StoredBlock, x, rope, mask, cfg):
        params = tree_to_compute(stored.tree, "", sharding.plan, stored.rules, gather)
        return block_fn(params, x, rope, mask, cfg)

    return checkpointed_block(gather_and_run, checkpointing)


def dp_sum(value: torch.Tensor, sharding: Sharding | None) -> torch.Tensor:
    """`value` summed over the data-parallel ranks (a statistic of whole rows, not differentiated)."""
    if sharding is None or sharding.layout.shape.dp == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, group=sharding.layout.dp_group)
    return value


def context_parallel_sum(value: torch.Tensor, sharding: Sharding | None) -> torch.Tensor:
    """`value` summed over the context-parallel ranks (the slices of the same rows)."""
    if sharding is None or sharding.cp is None:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, group=sharding.cp.group)
    return value


def loss_sum(value: torch.Tensor, sharding: Sharding | None) -> torch.Tensor:
    """`value` summed over the ranks that hold different targets: data-parallel ranks, and the
    context-parallel ranks' slices of each row (not differentiated)."""
    if sharding is None or sharding.layout.shape.dp * sharding.layout.shape.cp == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, group=sharding.layout.loss_group)
    return value


@torch.no_grad()
def global_grad_norm(grads: list[DTensor], sharding: Sharding) -> torch.Tensor:
    """The L2 norm of all gradients together, each element counted once across the mesh.

    Each rank sums the squares of its local shards, grouped by the mesh (the placement mesh, or the
    expert mesh) and its axes a gradient is sharded over; each group's sum is all-reduced over exactly
    those axes (replicated axes hold copies). Every rank issues the same collectives in the same order.
    """
    by_axes: dict[tuple[tuple[str, ...], tuple[int, ...]], torch.Tensor] = {}
    meshes = {}
    for grad in grads:
        local = grad.to_local()
        wide = local.to(torch.promote_types(local.dtype, torch.float32))
        axes = tuple(i for i, p in enumerate(grad.placements) if isinstance(p, Shard))
        key = (grad.device_mesh.mesh_dim_names, axes)
        meshes[key[0]] = grad.device_mesh
        by_axes[key] = by_axes.get(key, 0) + wide.pow(2).sum()
    total = None
    for (names, axes), squares in sorted(by_axes.items()):
        mesh = meshes[names]
        for axis in axes:
            if mesh.size(axis) > 1:
                dist.all_reduce(squares, group=mesh.get_group(axis))
        total = squares if total is None else total + squares
    if sharding.layout.shape.pp > 1:  # each pipeline rank holds other layers
        dist.all_reduce(total, group=sharding.layout.pp_group)
    return total.sqrt()


def local_tree(tree: TensorDict) -> TensorDict:
    """The same tree with every DTensor leaf replaced by its local shard (a view: in-place updates of
    the shard update the DTensor)."""
    return tree.apply(lambda t: t.to_local() if isinstance(t, DTensor) else t)
