"""The process group and the named device mesh of a multi-process run.

A run is multi-process when a launcher (torchrun, or Slurm through torchrun) sets ``WORLD_SIZE`` > 1;
then `start_process_group` joins the group (gloo on CPU, NCCL on CUDA) with a collective timeout, so
a rank that hangs or dies unseen makes the others fail instead of waiting forever. One process with
no launcher starts no group at all.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from olmo_fn.parallelize.parallel_config import MESH_AXES, MeshShape


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def under_launcher() -> bool:
    """Whether a launcher started this process: more than one process, or torchrun even with one."""
    return launched_world()[1] > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def start_process_group(device: torch.device, timeout_s: float) -> None:
    """Join the launcher's process group (no-op when already joined); a collective that waits more than
    `timeout_s` for another rank fails."""
    rank, world, local_rank = launched_world()
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)


def build_mesh(shape: MeshShape, device: torch.device) -> DeviceMesh:
    """The ``pp × dp_replicate × dp_shard × cp × tp`` mesh over the current process group."""
    return init_device_mesh(device.type, shape.mesh_sizes, mesh_dim_names=MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process sits: the mesh, its shape, and the groups the train step talks over.

    `mesh` is the placement mesh (`AXES`, over this rank's pipeline stage: ``dp_shard`` there is the
    flattened ``dp_shard × cp``); `full_mesh` has every axis of `MESH_AXES`; under expert parallelism,
    `expert_mesh` places the experts (`EXPERT_AXES`: dp_shard split into ``dp_shard / ep × ep``).
    """

    full_mesh: DeviceMesh
    shape: MeshShape

    @functools.cached_property
    def mesh(self) -> DeviceMesh:
        """dp_replicate × (dp_shard × cp) × tp, the axes of `AXES` in order."""
        if self.shape.cp == 1:
            return self.full_mesh["dp_replicate", "dp_shard", "tp"]
        # A mesh of its own whose middle axis enumerates dp_shard x cp in the full mesh's order.
        s = self.shape
        names = ("pp", "dp_replicate", "dp_shard_cp", "tp")
        sizes = (s.pp, s.dp_replicate, s.dp_shard * s.cp, s.tp)
        return init_device_mesh(self.full_mesh.device_type, sizes, mesh_dim_names=names)[names[1:]]

    @functools.cached_property
    def expert_mesh(self) -> DeviceMesh | None:
        """dp_replicate × (dp_shard / ep) × ep × tp, over the same ranks as `mesh` (a rank's dp_shard
        coordinate is ``its dp_shard / ep coordinate × ep + its ep coordinate``); None when ep is 1."""
        s = self.shape
        if s.ep == 1:
            return None
        names = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp")
        sizes = (s.pp, s.dp_replicate, s.dp_shard // s.ep, s.ep, s.cp, s.tp)
        mesh = init_device_mesh(self.full_mesh.device_type, sizes, mesh_dim_names=names)
        return mesh["dp_replicate", "dp_shard_mod_ep", "ep", "tp"]

    def _coordinate(self, axis: str) -> int:
        return self.full_mesh.get_coordinate()[MESH_AXES.index(axis)]

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (which slice of each global batch it reads)."""
        return self._coordinate("dp_replicate") * self.shape.dp_shard + self._coordinate("dp_shard")

    @property
    def tp_rank(self) -> int:
        return self._coordinate("tp")

    @property
    def cp_rank(self) -> int:
        return self._coordinate("cp")

    @property
    def ep_rank(self) -> int:
        """This rank's index among the expert-parallel ranks (which experts it runs)."""
        return self._coordinate("dp_shard") % self.shape.ep

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.expert_mesh.get_group("ep")

    @property
    def pp_rank(self) -> int:
        return self._coordinate("pp")

    @functools.cached_property
    def dp_group(self) -> dist.ProcessGroup:
        """The group of ranks that hold different data (dp_replicate × dp_shard), for data statistics."""
        return self.full_mesh["dp_replicate", "dp_shard"]._flatten("dp").get_group()

    @functools.cached_property
    def loss_group(self) -> dist.ProcessGroup:
        """The group of ranks that hold different targets (dp_replicate × dp_shard × cp), for loss sums."""
        return self.full_mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp").get_group()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.full_mesh.get_group("tp")

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.full_mesh.get_group("cp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.full_mesh.get_group("pp")
