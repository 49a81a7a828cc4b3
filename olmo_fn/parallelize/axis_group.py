"""`AxisGroup`: the ranks along one mesh axis, and this rank's index among them."""

from __future__ import annotations

import dataclasses

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class AxisGroup:
    """This rank's place along one mesh axis (tp or cp): the axis's process group, this rank's index
    in it (0-based, in mesh order) and the axis size."""

    group: dist.ProcessGroup
    rank: int
    size: int
