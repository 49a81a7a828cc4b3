"""`ParallelConfig`: how many processes a run spreads over, and along which axes; checked up front.

The world is a mesh ``dp_replicate × dp_shard × tp``: data-parallel replicas (HSDP's outer axis),
data-parallel shards (FSDP: parameters, gradients and optimizer moments sharded across them), and
tensor parallelism (heads, MLP hidden units and the vocabulary split; the sequence split between
the matmuls). Every problem is named before any process group starts.
"""

from __future__ import annotations

import dataclasses

from olmo_fn.errors import ConfigError
from olmo_fn.graph.config import ModelConfig

AXES = ("dp_replicate", "dp_shard", "tp")
"""Mesh axis names, outermost first (the innermost, tp, gets the ranks closest together)."""


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
    collective_timeout_s: float = 600.0
    """How long a collective waits for a rank that does not come (hung, or gone without the launcher
    noticing) before it fails, and the run with it. torchrun stops every rank within seconds of one
    exiting; this bounds the cases it cannot see. Rank 0 alone does some slow work (checksums of a
    synchronous checkpoint, pruning) while the others wait: keep it well above that."""

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"parallel.collective_timeout_s={self.collective_timeout_s} must be > 0")
        if self.dp_shard < 1 and self.dp_shard != -1:
            raise ConfigError(
                f"parallel.dp_shard={self.dp_shard} must be >= 1, or -1 for the rest of the world"
            )


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Resolved degrees: one size per axis of `AXES`."""

    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.dp_replicate, self.dp_shard, self.tp)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of each global batch are processed at once."""
        return self.dp_replicate * self.dp_shard

    def __str__(self) -> str:
        return " x ".join(f"{name} {size}" for name, size in zip(AXES, self.sizes, strict=True))


def resolve_mesh_shape(cfg: ParallelConfig, world: int) -> MeshShape:
    """The mesh for `world` processes; a ConfigError naming the degrees when they do not fit."""
    fixed = cfg.dp_replicate * cfg.tp
    if cfg.dp_shard == -1:
        if world % fixed:
            raise ConfigError(
                f"parallel.dp_replicate={cfg.dp_replicate} x parallel.tp={cfg.tp} = {fixed} does not divide "
                f"the world size {world}"
            )
        return MeshShape(cfg.dp_replicate, world // fixed, cfg.tp)
    shape = MeshShape(cfg.dp_replicate, cfg.dp_shard, cfg.tp)
    if shape.world != world:
        raise ConfigError(
            f"parallel.dp_replicate={cfg.dp_replicate} x dp_shard={cfg.dp_shard} x tp={cfg.tp} = "
            f"{shape.world}, but the world size is {world} (set parallel.dp_shard=-1 to use the rest)"
        )
    return shape


def parallel_problems(
    shape: MeshShape, model: ModelConfig, *, global_batch: int, micro_batch: int, seq_len: int
) -> list[str]:
    """Every reason `model` and the batch cannot run on `shape`, each naming the degree and what it
    must divide."""
    problems = []
    tp = shape.tp
    if tp > 1:
        for name in ("n_heads", "n_kv_heads", "mlp_hidden", "vocab_size"):
            value = getattr(model, name)
            if value % tp:
                problems.append(f"parallel.tp={tp} does not divide model.{name}={value}")
        if seq_len % tp:
            problems.append(f"parallel.tp={tp} does not divide data.seq_len={seq_len} (sequence parallel)")
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
    return problems
