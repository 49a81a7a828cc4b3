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
from olmo_fn.parallelize.parallel_config import MESH_AXES, MeshShape
from olmo_fn.parallelize.pipeline_stages import rank_stages, stage_layers, stage_paths
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


def local_shape(
    shape: tuple[int, ...], rule: Rule, mesh: MeshShape, *, compute: bool = False
) -> tuple[int, ...]:
    """The shape of rank 0's shard (the largest: DTensor gives the first ranks the larger pieces), as
    stored, or in its compute layout (e.g. the tp shard, or an ep rank's experts)."""
    local = list(shape)
    placements = rule.compute_placements if compute else rule.placements
    for placement, size in zip(placements, rule.axis_sizes(mesh), strict=True):
        if isinstance(placement, Shard) and size > 1:
            local[placement.dim] = math.ceil(local[placement.dim] / size)
    return tuple(local)


def rank_bytes(model: ModelConfig, plan: Plan, mesh: MeshShape, paths: list[str]) -> dict[str, int]:
    """Bytes rank 0 of a stage holds for its `paths`: parameters (fp32), gradients (fp32, placed like
    the parameters) and the two AdamW moments, plus the largest block gathered to its compute layout."""
    shapes = {path: shape for path, shape in param_shapes(model).items() if path in set(paths)}
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
                gathered += math.prod(local_shape(shape, rules[path], mesh, compute=True))
        block = max(block, compute_bytes * gathered)
    return {
        "parameters": params,
        "gradients": params,
        "optimizer_moments": 2 * params,
        "gathered_block": block,
    }


def activation_bytes(
    model: ModelConfig, mesh: MeshShape, micro_batch: int, seq_len: int, *, layers: int, head: bool
) -> int:
    """Estimate of what one micro-batch keeps for backward on one rank through `layers` layers: the
    saved activations of its tokens (a context-parallel slice; sequence parallel: split over tp),
    under context parallelism the keys and values gathered from the other slices (16 bits), and on
    the last stage (`head`) the fp32 logits and their gradient (split over the vocabulary)."""
    tokens = micro_batch * seq_len // mesh.cp
    saved = layers * ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH * tokens * model.d_model // mesh.tp
    if mesh.cp > 1:
        kv_width = 2 * model.n_kv_heads * model.d_head // mesh.tp
        saved += layers * 2 * micro_batch * seq_len * kv_width
    logits = 2 * 4 * tokens * model.vocab_size // mesh.tp if head else 0
    return saved + logits


def micro_batches_in_flight(schedule: str, pp: int, stages_per_rank: int, micro_batches: int) -> float:
    """Estimate of how many micro-batches' activations the first pipeline rank holds at its peak, in
    units of "all its layers" (a stage of an interleaved schedule holds 1 / stages_per_rank of them)."""
    if pp == 1 or schedule in ("gpipe", "looped-bfs"):
        return micro_batches if pp > 1 else 1
    if schedule == "1f1b":
        return min(micro_batches, pp)
    warmup = (stages_per_rank - 1) * pp + 2 * (pp - 1) + 1  # stage forwards before the first backward
    return min(micro_batches * stages_per_rank, warmup) / stages_per_rank


def plan_report(cmd: PlanCommand) -> dict[str, Any]:
    """The figures `plan` prints (see the module docstring)."""
    parallel = cmd.parallel
    shape = plan_world(
        parallel,
        cmd.model,
        world=cmd.world_size,
        global_batch=cmd.global_batch_size,
        micro_batch=cmd.micro_batch,
        seq_len=cmd.data.seq_len,
    )
    compute = DTYPES["bfloat16"] if cmd.dtype == "auto" else DTYPES[cmd.dtype]  # auto: bf16 on GPUs
    plan = default_plan(cmd.model, shape, compute_dtype=compute)
    rows = cmd.global_batch_size // shape.dp
    per_rank_micro = min(cmd.micro_batch, rows)
    per_rank = parallel.stages_per_rank
    n_stages = shape.pp * per_rank
    layers = stage_layers(cmd.model.n_layers, n_stages)
    held: dict[str, int] | None = None
    for pp_rank in range(shape.pp):  # the busiest pipeline rank
        stages = rank_stages(pp_rank, shape.pp, per_rank, parallel.pp_schedule)
        paths = [path for stage in stages for path in stage_paths(cmd.model, stage, n_stages)]
        candidate = rank_bytes(cmd.model, plan.for_paths(paths), shape, paths)
        in_flight = micro_batches_in_flight(parallel.pp_schedule, shape.pp, per_rank, rows // per_rank_micro)
        n_layers = sum(len(layers[stage]) for stage in stages)
        one = activation_bytes(
            cmd.model,
            shape,
            per_rank_micro,
            cmd.data.seq_len,
            layers=n_layers,
            head=n_stages - 1 in stages,
        )
        candidate["activations_in_flight"] = int(one * in_flight)
        if held is None or sum(candidate.values()) > sum(held.values()):
            held = candidate
    assert held is not None
    report = {
        "preset": cmd.preset,
        "world_size": shape.world,
        "mesh": dict(zip(MESH_AXES, shape.mesh_sizes, strict=True))
        | ({"ep": shape.ep} if shape.ep > 1 else {}),
        "micro_batch_per_rank": per_rank_micro,
        "bytes_per_rank": held,
        "total_bytes_per_rank": sum(held.values()),
        "table": plan_table(plan, cmd.model, shape),
    }
    if shape.pp > 1:
        report["pipeline"] = {
            "schedule": parallel.pp_schedule,
            "stages": [
                {
                    "stage": s,
                    "rank": r,
                    "layers": [layers[s].start, layers[s].stop - 1] if len(layers[s]) else [],
                }
                for r in range(shape.pp)
                for s in rank_stages(r, shape.pp, per_rank, parallel.pp_schedule)
            ],
        }
    return report


def format_report(report: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return orjson.dumps({k: v for k, v in report.items() if k != "table"}).decode()
    mesh = dict(report["mesh"])
    ep = mesh.pop("ep", 1)  # a factor of dp_shard, not of the world
    shape = " x ".join(f"{k} {v}" for k, v in mesh.items()) + (f"; ep {ep} within dp_shard" if ep > 1 else "")
    lines = [f"{report['preset']} on {report['world_size']} processes ({shape})", "", report["table"], ""]
    if "pipeline" in report:
        lines.append(f"pipeline stages ({report['pipeline']['schedule']}):")
        for stage in sorted(report["pipeline"]["stages"], key=lambda s: s["stage"]):
            first, last = stage["layers"] or (None, None)
            held = f"layers {first}-{last}" if first is not None else "no layers"
            extra = " + embedding" if stage["stage"] == 0 else ""
            extra += (
                " + LM head and loss"
                if stage is max(report["pipeline"]["stages"], key=lambda s: s["stage"])
                else ""
            )
            lines.append(f"  stage {stage['stage']} on pp rank {stage['rank']}: {held}{extra}")
        lines.append("")
    names = {
        "parameters": "parameters (fp32)",
        "gradients": "gradients (fp32)",
        "optimizer_moments": "AdamW moments (fp32)",
        "gathered_block": "one block gathered",
        "activations_in_flight": f"activations ({report['micro_batch_per_rank']} rows/micro-batch, estimate)",
    }
    lines.append("bytes per rank (the busiest rank; its first shard holds the largest pieces):")
    for key, name in names.items():
        lines.append(f"  {name:<46} {report['bytes_per_rank'][key] / 2**30:>10,.3f} GiB")
    lines.append(f"  {'total':<46} {report['total_bytes_per_rank'] / 2**30:>10,.3f} GiB")
    return "\n".join(lines)
