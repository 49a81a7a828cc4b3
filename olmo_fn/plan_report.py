"""``plan``: where a run's parameters would live and how many bytes each rank would hold, printed
without starting any process (the numbers come from the plan's placements and the model's shapes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import orjson
import torch
from torch.distributed.tensor import Shard

from olmo_fn.config import TrainConfig
from olmo_fn.errors import ConfigError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import param_shapes
from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.parallelize.plan import Plan, Rule, default_plan, plan_table
from olmo_fn.parallelize.world import plan_world
from olmo_fn.runtime import DTYPES

ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH = 34
"""Saved activations of one transformer layer, in bytes per token per unit of d_model, at 16 bits
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", without
the attention-score term: SDPA's fused kernels and FlexAttention keep no scores)."""


@dataclasses.dataclass(frozen=True)
class PlanCommand(TrainConfig):
    """Print a run's placement plan and the bytes per rank, without starting any process.

    Takes every train option; --world-size is the number of processes the run would have.
    """

    world_size: int = 1
    """Processes the run would span (torchrun's nnodes x nproc-per-node)."""
    json: bool = False
    """Print the figures as one JSON line instead of the table."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.world_size < 1:
            raise ConfigError(f"world_size={self.world_size} must be >= 1")


def local_shape(shape: tuple[int, ...], rule: Rule, mesh: MeshShape) -> tuple[int, ...]:
    """The shape of rank 0's shard (the largest: DTensor gives the first ranks the larger pieces)."""
    local = list(shape)
    for placement, size in zip(rule.placements, mesh.sizes, strict=True):
        if isinstance(placement, Shard) and size > 1:
            local[placement.dim] = math.ceil(local[placement.dim] / size)
    return tuple(local)


def rank_bytes(model: ModelConfig, plan: Plan, mesh: MeshShape) -> dict[str, int]:
    """Bytes rank 0 holds for parameters (fp32), gradients (fp32, placed like the parameters) and the
    two AdamW moments, plus the largest block gathered to its compute layout."""
    shapes = param_shapes(model)
    rules = plan.rules_by_path(list(shapes))
    local = {path: math.prod(local_shape(shape, rules[path], mesh)) for path, shape in shapes.items()}
    params = 4 * sum(local.values())
    compute_bytes = torch.tensor([], dtype=plan.compute_dtype).element_size()
    block = 0
    for layer in range(model.n_layers):
        prefix = f"blocks.{layer}."
        gathered = 0
        for path, shape in shapes.items():
            if path.startswith(prefix):
                tp_split = rules[path].tp
                divisor = mesh.tp if isinstance(tp_split, Shard) else 1
                gathered += math.prod(shape) // divisor
        block = max(block, compute_bytes * gathered)
    return {
        "parameters": params,
        "gradients": params,
        "optimizer_moments": 2 * params,
        "gathered_block": block,
    }


def activation_bytes(model: ModelConfig, mesh: MeshShape, micro_batch: int, seq_len: int) -> int:
    """Estimate of what one micro-batch keeps for backward on one rank: every layer's saved
    activations (sequence-parallel: split over tp) plus the fp32 logits and their gradient (split over
    the vocabulary)."""
    tokens = micro_batch * seq_len
    layers = model.n_layers * ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH * tokens * model.d_model // mesh.tp
    logits = 2 * 4 * tokens * model.vocab_size // mesh.tp
    return layers + logits


def plan_report(cmd: PlanCommand) -> dict[str, Any]:
    """The figures `plan` prints (see the module docstring)."""
    shape = plan_world(
        cmd.parallel,
        cmd.model,
        world=cmd.world_size,
        global_batch=cmd.global_batch_size,
        micro_batch=cmd.micro_batch,
        seq_len=cmd.data.seq_len,
    )
    compute = DTYPES["bfloat16"] if cmd.dtype == "auto" else DTYPES[cmd.dtype]  # auto: bf16 on GPUs
    plan = default_plan(cmd.model, shape, compute_dtype=compute)
    per_rank_micro = min(cmd.micro_batch, cmd.global_batch_size // shape.dp)
    held = rank_bytes(cmd.model, plan, shape)
    held["activations_per_micro_batch"] = activation_bytes(cmd.model, shape, per_rank_micro, cmd.data.seq_len)
    return {
        "preset": cmd.preset,
        "world_size": shape.world,
        "mesh": dict(zip(("dp_replicate", "dp_shard", "tp"), shape.sizes, strict=True)),
        "micro_batch_per_rank": per_rank_micro,
        "bytes_per_rank": held,
        "total_bytes_per_rank": sum(held.values()),
        "table": plan_table(plan, cmd.model, shape),
    }


def format_report(report: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return orjson.dumps({k: v for k, v in report.items() if k != "table"}).decode()
    shape = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    lines = [f"{report['preset']} on {report['world_size']} processes ({shape})", "", report["table"], ""]
    names = {
        "parameters": "parameters (fp32)",
        "gradients": "gradients (fp32)",
        "optimizer_moments": "AdamW moments (fp32)",
        "gathered_block": "one block gathered",
        "activations_per_micro_batch": f"activations ({report['micro_batch_per_rank']} rows, estimate)",
    }
    lines.append("bytes per rank (rank 0 holds the largest shards):")
    for key, name in names.items():
        lines.append(f"  {name:<34} {report['bytes_per_rank'][key] / 2**30:>10,.3f} GiB")
    lines.append(f"  {'total':<34} {report['total_bytes_per_rank'] / 2**30:>10,.3f} GiB")
    return "\n".join(lines)
