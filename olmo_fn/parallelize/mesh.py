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

from olmo_fn.parallelize.parallel_config import AXES, MeshShape


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
    """The ``dp_replicate × dp_shard × tp`` mesh over the current process group."""
    return init_device_mesh(device.type, shape.sizes, mesh_dim_names=AXES)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process sits: the mesh, its shape, and the groups the train step talks over."""

    mesh: DeviceMesh
    shape: MeshShape

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (which slice of each global batch it reads)."""
        coords = self.mesh.get_coordinate()
        return coords[0] * self.shape.dp_shard + coords[1]

    @property
    def tp_rank(self) -> int:
        return self.mesh.get_coordinate()[2]

    @functools.cached_property
    def dp_group(self) -> dist.ProcessGroup:
        """The group of ranks that hold different data (dp_replicate × dp_shard), for data statistics."""
        return self.mesh["dp_replicate", "dp_shard"]._flatten("dp").get_group()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("tp")
