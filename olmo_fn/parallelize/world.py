"""The processes a run spans: checked before any group starts, then joined, meshed and planned.

`plan_world` resolves `ParallelConfig` against the launcher's world size and names every problem
without touching the network; `join_world` then starts the process group, builds the mesh and the
default plan. A single process with no launcher gets no `World` at all and runs exactly as before.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from olmo_fn.errors import ConfigError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import flatten, param_shapes, unflatten
from olmo_fn.parallelize.mesh import Layout, build_mesh, launched_world, start_process_group, under_launcher
from olmo_fn.parallelize.parallel_config import (
    MeshShape,
    ParallelConfig,
    parallel_problems,
    resolve_mesh_shape,
)
from olmo_fn.parallelize.pipeline_stages import rank_stages, stage_paths
from olmo_fn.parallelize.placed_step import PipelineSpec, Sharding
from olmo_fn.parallelize.plan import apply_plan, default_plan
from olmo_fn.state.optim import zeros_like_state
from olmo_fn.state.train_state import TrainState


def plan_world(
    parallel: ParallelConfig,
    model: ModelConfig,
    *,
    world: int,
    global_batch: int,
    micro_batch: int,
    seq_len: int,
) -> MeshShape:
    """The mesh shape for `world` processes; a ConfigError naming every problem (nothing started)."""
    shape = resolve_mesh_shape(parallel, world)
    problems = parallel_problems(
        shape,
        model,
        global_batch=global_batch,
        micro_batch=micro_batch,
        seq_len=seq_len,
        pp_schedule=parallel.pp_schedule,
        stages_per_rank=parallel.stages_per_rank,
    )
    if problems:
        raise ConfigError("invalid parallel config: " + "; ".join(problems))
    return shape


@dataclasses.dataclass(frozen=True)
class World:
    """This process's rank among `size`, its place on the mesh, and the plan its state is placed by."""

    rank: int
    size: int
    sharding: Sharding

    @property
    def shape(self) -> MeshShape:
        return self.sharding.layout.shape

    @property
    def is_coordinator(self) -> bool:
        """Rank 0 writes the run directory's files and prints progress."""
        return self.rank == 0

    def place(self, state: TrainState) -> TrainState:
        """`state` with its parameters placed by the plan and a zero optimizer state of its layout
        placed like them; under pipeline parallelism, only this rank's stages' parameters. Every
        process passes the same full values (a deterministic init, or a template about to be loaded)."""
        flat = flatten(state.params)
        held = unflatten({path: flat[path] for path in self.sharding.rules})
        layout = self.sharding.layout
        params = apply_plan(held, self.sharding.plan, layout.mesh, layout.expert_mesh)
        return dataclasses.replace(state, params=params, opt_state=zeros_like_state(state.opt_state, params))

    def broadcast(self, value: object) -> object:
        """Rank 0's `value` on every rank (a Python object, e.g. the default run directory)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def start_world(
    parallel: ParallelConfig,
    model: ModelConfig,
    device: torch.device,
    compute_dtype: torch.dtype,
    *,
    global_batch: int,
    micro_batch: int,
    seq_len: int,
) -> tuple[World | None, torch.device]:
    """Check `parallel` against the launcher's world size (before any process group starts), then join
    the world: under a launcher, even of one process (a 1-rank plan, e.g. to measure its overhead).
    Without a launcher: (None, device), and nothing is started. Returns the device this rank uses."""
    _, world_size, local_rank = launched_world()
    shape = plan_world(
        parallel, model, world=world_size, global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len
    )
    if not under_launcher():
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    pipeline = PipelineSpec(parallel.pp_schedule, parallel.stages_per_rank) if shape.pp > 1 else None
    world = join_world(
        shape, model, device, compute_dtype, timeout_s=parallel.collective_timeout_s, pipeline=pipeline
    )
    return world, device


def join_world(
    shape: MeshShape,
    model: ModelConfig,
    device: torch.device,
    compute_dtype: torch.dtype,
    *,
    timeout_s: float,
    pipeline: PipelineSpec | None = None,
) -> World:
    """Start (or join) the launcher's process group (collectives failing after `timeout_s`) and build the
    mesh and the default plan."""
    start_process_group(device, timeout_s)
    rank, size, _ = launched_world()
    layout = Layout(build_mesh(shape, device), shape)
    plan = default_plan(model, shape, compute_dtype=compute_dtype)
    if pipeline is None:
        return World(rank, size, Sharding.of(plan, layout, list(param_shapes(model))))
    return World(rank, size, Sharding.of(plan, layout, rank_paths(model, layout, pipeline), pipeline))


def rank_paths(model: ModelConfig, layout: Layout, pipeline: PipelineSpec) -> list[str]:
    """The parameter paths of the pipeline stages this rank runs."""
    shape = layout.shape
    n_stages = shape.pp * pipeline.stages_per_rank
    stages = rank_stages(layout.pp_rank, shape.pp, pipeline.stages_per_rank, pipeline.schedule)
    return [path for stage in stages for path in stage_paths(model, stage, n_stages)]
