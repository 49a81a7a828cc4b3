"""`ParallelConfig`: how many processes a run spreads over, and along which axes; checked up front.

The world is a mesh ``pp × dp_replicate × dp_shard × cp × tp``: pipeline stages (each holding a
slice of the layers), data-parallel replicas (HSDP's outer axis), data-parallel shards (FSDP:
parameters, gradients and optimizer moments sharded across them), context parallelism (each rank
holds a load-balanced slice of every sequence; parameters are sharded over it too, like FSDP), and
tensor parallelism (heads, MLP hidden units and the vocabulary split; the sequence split between the
matmuls). Expert parallelism (``ep``) is not a factor of the world: it is carved out of ``dp_shard``
(``dp_shard = dp_shard / ep × ep``, ep innermost), so each ep rank still reads its own rows of the
batch, and holds the experts of its ep index. Every problem is named before any process group starts.
"""

from __future__ import annotations

import dataclasses
import math

from olmo_fn.errors import ConfigError
from olmo_fn.graph.config import ModelConfig

MESH_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""Every mesh axis, outermost first (the innermost, tp, gets the ranks closest together)."""
AXES = ("dp_replicate", "dp_shard", "tp")
"""The axes a parameter is placed over. Context-parallel ranks shard parameters like data-parallel
shards, so the ``dp_shard`` placement axis spans ``dp_shard × cp``; pipeline stages are not
placements (a stage holds its layers whole)."""
EXPERT_AXES = ("dp_replicate", "dp_shard", "ep", "tp")
"""The axes an expert-parallel parameter (``*.feed_forward.experts.*``) is placed over: ``dp_shard`` there
is the ``dp_shard / ep`` ranks that hold the same experts, ``ep`` the ranks holding different ones."""

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "interleaved-zb", "zbv")
"""Pipeline schedules by name (torch.distributed.pipelining); the last four run several stages per rank."""
MULTI_STAGE_SCHEDULES = PP_SCHEDULES[2:]
ZERO_BUBBLE_SCHEDULES = ("interleaved-zb", "zbv")
"""Schedules that split each backward into an input-gradient and a weight-gradient pass."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism; their product is the number of processes (the launcher's world size)."""

    dp_replicate: int = 1
    """Data-parallel replicas, each holding a full copy of the (dp_shard-sharded) state: HSDP's outer axis."""
    dp_shard: int = -1
    """Data-parallel ranks that shard parameters, gradients and optimizer moments (FSDP); -1: whatever
    the world size leaves after dp_replicate and tp."""
    tp: int = 1
    """Tensor-parallel ranks: attention heads, MLP hidden units and the vocabulary are split across them,
    and the sequence between the matmuls (sequence parallel)."""
    cp: int = 1
    """Context-parallel ranks: each holds a load-balanced slice of every sequence (the head and tail
    chunks of 2 x cp), gathers keys and values from the others, and shards the parameters like FSDP."""
    pp: int = 1
    """Pipeline-parallel ranks: the layers are split into consecutive stages (embedding on the first,
    LM head and loss on the last) that micro-batches flow through."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved-1f1b, looped-bfs, interleaved-zb or zbv (zero bubble,
    V-shaped: 2 stages per rank)."""
    pp_stages_per_rank: int = 0
    """Stages each pipeline rank runs (interleaved schedules: 2 or more); 0: 1 for gpipe and 1f1b, 2 for
    the others."""
    ep: int = 1
    """Expert-parallel ranks: the experts of every MoE layer are split over them (each runs its own
    n_experts / ep experts, for every ep rank's tokens, sent there and back by an all-to-all). Carved out
    of dp_shard (ep must divide it): each ep rank still trains rows of its own."""
    collective_timeout_s: float = 600.0
    """How long a collective waits for a rank that does not come (hung, or gone without the launcher
    noticing) before it fails, and the run with it. torchrun stops every rank within seconds of one
    exiting; this bounds the cases it cannot see. Rank 0 alone does some slow work (checksums of a
    synchronous checkpoint, pruning) while the others wait: keep it well above that."""

    @property
    def splits_work(self) -> bool:
        """Whether this config asks for more than one process's share (any axis above 1)."""
        return any(getattr(self, a) > 1 for a in ("dp_replicate", "dp_shard", "tp", "cp", "pp", "ep"))

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "tp", "cp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"parallel.collective_timeout_s={self.collective_timeout_s} must be > 0")
        if self.dp_shard < 1 and self.dp_shard != -1:
            raise ConfigError(
                f"parallel.dp_shard={self.dp_shard} must be >= 1, or -1 for the rest of the world"
            )
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(
                f"parallel.pp_schedule={self.pp_schedule!r} is not a schedule; choose one of "
                + ", ".join(PP_SCHEDULES)
            )
        if self.pp_stages_per_rank < 0:
            raise ConfigError(f"parallel.pp_stages_per_rank={self.pp_stages_per_rank} must be >= 0")

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pp rank runs (1 without pipeline parallelism)."""
        if self.pp == 1:
            return 1
        if self.pp_stages_per_rank:
            return self.pp_stages_per_rank
        return 2 if self.pp_schedule in MULTI_STAGE_SCHEDULES else 1


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Resolved degrees: one size per axis of `AXES`."""

    dp_replicate: int
    dp_shard: int
    tp: int
    cp: int = 1
    pp: int = 1
    ep: int = 1
    """Expert-parallel ranks, a factor of dp_shard (not of the world)."""

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Sizes of the placement axes, in `AXES` order (parameters are sharded over dp_shard x cp)."""
        return (self.dp_replicate, self.dp_shard * self.cp, self.tp)

    @property
    def expert_sizes(self) -> tuple[int, int, int, int]:
        """Sizes of the expert placement axes, in `EXPERT_AXES` order (dp_shard / ep, then ep)."""
        return (self.dp_replicate, self.dp_shard // self.ep, self.ep, self.tp)

    @property
    def mesh_sizes(self) -> tuple[int, ...]:
        """Sizes of every mesh axis, in `MESH_AXES` order."""
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def world(self) -> int:
        return math.prod(self.mesh_sizes)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of each global batch are processed at once."""
        return self.dp_replicate * self.dp_shard

    def __str__(self) -> str:
        text = " x ".join(f"{name} {size}" for name, size in zip(MESH_AXES, self.mesh_sizes, strict=True))
        return text + (f" (ep {self.ep} within dp_shard)" if self.ep > 1 else "")


def resolve_mesh_shape(cfg: ParallelConfig, world: int) -> MeshShape:
    """The mesh for `world` processes; a ConfigError naming the degrees when they do not fit."""
    fixed = cfg.pp * cfg.dp_replicate * cfg.cp * cfg.tp
    named = f"parallel.pp={cfg.pp} x dp_replicate={cfg.dp_replicate} x cp={cfg.cp} x tp={cfg.tp}"
    if cfg.dp_shard == -1:
        if world % fixed:
            raise ConfigError(f"{named} = {fixed} does not divide the world size {world}")
        return MeshShape(cfg.dp_replicate, world // fixed, cfg.tp, cfg.cp, cfg.pp, cfg.ep)
    shape = MeshShape(cfg.dp_replicate, cfg.dp_shard, cfg.tp, cfg.cp, cfg.pp, cfg.ep)
    if shape.world != world:
        raise ConfigError(
            f"{named} x dp_shard={cfg.dp_shard} = {shape.world}, but the world size is {world} "
            "(set parallel.dp_shard=-1 to use the rest)"
        )
    return shape


def parallel_problems(
    shape: MeshShape,
    model: ModelConfig,
    *,
    global_batch: int,
    micro_batch: int,
    seq_len: int,
    pp_schedule: str = "1f1b",
    stages_per_rank: int = 1,
) -> list[str]:
    """Every reason `model` and the batch cannot run on `shape`, each naming the degree and what it
    must divide."""
    problems = []
    tp, cp, pp = shape.tp, shape.cp, shape.pp
    if tp > 1:
        for name in ("n_heads", "n_kv_heads", "mlp_hidden", "vocab_size"):
            value = getattr(model, name)
            if value % tp:
                problems.append(f"parallel.tp={tp} does not divide model.{name}={value}")
    if cp > 1 and seq_len % (2 * cp):
        problems.append(
            f"data.seq_len={seq_len} is not divisible by 2 x parallel.cp = {2 * cp} (each context-parallel "
            "rank holds two of 2 x cp equal chunks)"
        )
    elif tp > 1 and (seq_len // cp) % tp:
        where = (
            f"each context-parallel slice of {seq_len // cp} tokens" if cp > 1 else f"data.seq_len={seq_len}"
        )
        problems.append(f"parallel.tp={tp} does not divide {where} (sequence parallel)")
    if global_batch % shape.dp:
        problems.append(
            f"the data-parallel degree {shape.dp} (dp_replicate x dp_shard) does not divide "
            f"global_batch_size={global_batch}"
        )
    elif (global_batch // shape.dp) % micro_batch and micro_batch <= global_batch // shape.dp:
        problems.append(
            f"micro_batch_size={micro_batch} does not divide the {global_batch // shape.dp} instances each "
            f"data-parallel rank gets per step (global_batch_size={global_batch} / {shape.dp})"
        )
    problems += expert_parallel_problems(shape, model)
    if pp > 1:
        problems += pipeline_problems(
            shape,
            model,
            global_batch=global_batch,
            micro_batch=micro_batch,
            schedule=pp_schedule,
            stages_per_rank=stages_per_rank,
        )
    return problems


def expert_parallel_problems(shape: MeshShape, model: ModelConfig) -> list[str]:
    """Why the experts cannot be split over ``shape.ep`` ranks (empty when ep is 1 or it fits). An MoE
    model with tp, cp or pp is refused whatever ep is (`olmo_fn.state.moe_terms.moe_run_problems`)."""
    ep = shape.ep
    if ep == 1:
        return []
    moe = model.moe
    if not any(moe.is_moe_layer(i) for i in range(model.n_layers)):
        return [f"parallel.ep={ep} needs an MoE model (model.moe.n_experts > 0 with an MoE layer)"]
    problems = []
    if moe.n_experts % ep:
        problems.append(f"parallel.ep={ep} does not divide model.moe.n_experts={moe.n_experts}")
    if shape.dp_shard % ep:
        problems.append(
            f"parallel.ep={ep} does not divide the data-parallel shard degree dp_shard={shape.dp_shard} "
            "(expert-parallel ranks are carved out of dp_shard)"
        )
    if moe.capacity_factor:
        problems.append(
            f"parallel.ep={ep} with model.moe.capacity_factor={moe.capacity_factor} is not supported yet "
            "(expert parallelism is dropless: set it to 0)"
        )
    return problems


def pipeline_problems(
    shape: MeshShape,
    model: ModelConfig,
    *,
    global_batch: int,
    micro_batch: int,
    schedule: str,
    stages_per_rank: int,
) -> list[str]:
    """Why the layers or the micro-batches cannot flow through `shape.pp` ranks under `schedule`."""
    problems = []
    pp = shape.pp
    stages = pp * stages_per_rank
    if schedule in MULTI_STAGE_SCHEDULES and stages_per_rank < 2:
        problems.append(
            f"parallel.pp_schedule={schedule} runs several stages per rank: set pp_stages_per_rank >= 2"
        )
    if schedule not in MULTI_STAGE_SCHEDULES and stages_per_rank != 1:
        problems.append(
            f"parallel.pp_schedule={schedule} runs one stage per rank, not "
            f"pp_stages_per_rank={stages_per_rank}"
        )
    if schedule == "zbv" and stages_per_rank != 2:
        problems.append(f"parallel.pp_schedule=zbv runs exactly 2 stages per rank, not {stages_per_rank}")
    if stages > model.n_layers:
        problems.append(
            f"{stages} pipeline stages (parallel.pp={pp} x {stages_per_rank} per rank) need at least as many "
            f"layers, but model.n_layers={model.n_layers}"
        )
    if model.tie_embeddings:
        problems.append(
            "pipeline parallelism (parallel.pp > 1) with model.tie_embeddings is not supported: "
            "the embedding lives on the first stage and the LM head on the last"
        )
    if shape.cp > 1:
        problems.append(
            "context and pipeline parallelism together (parallel.cp > 1 and parallel.pp > 1) "
            "are not supported yet"
        )
    if not global_batch % shape.dp:
        rows = global_batch // shape.dp
        micro_batches = max(1, rows // micro_batch)
        need = micro_batch_rule(schedule, pp, micro_batches)
        if need:
            problems.append(
                f"parallel.pp_schedule={schedule} on pp={pp} ranks needs {need}, but each data-parallel rank "
                f"gets {micro_batches} micro-batch(es) per step ({rows} rows / micro_batch_size="
                f"{micro_batch}): change global_batch_size or micro_batch_size"
            )
    return problems


def micro_batch_rule(schedule: str, pp: int, micro_batches: int) -> str:
    """What `schedule` needs of the micro-batch count that `micro_batches` lacks ("" when it fits):
    torch.distributed.pipelining's own rules, checked before any process starts."""
    if schedule == "1f1b" and micro_batches < pp:
        return f"at least pp={pp} micro-batches"
    if schedule in ("interleaved-1f1b", "interleaved-zb"):
        rounds = max(1, micro_batches // pp)
        if micro_batches % rounds:
            return f"a micro-batch count divisible by its rounds (count // pp = {rounds}), e.g. k x {pp}"
    return ""
