"""`Batch`: the tensors one training step consumes."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Batch:
    """A batch of fixed-length instances, each field (batch, seq) int64.

    labels hold the next token at each position, or IGNORE_INDEX where there is no target.
    doc_ids number the documents within each row (non-decreasing); positions restart at 0 at the
    start of each document.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in dataclasses.astuple(self)))

    def split(self, micro_batch_size: int) -> list[Batch]:
        """Consecutive micro-batches of at most `micro_batch_size` rows."""
        parts = [t.split(micro_batch_size) for t in dataclasses.astuple(self)]
        return [Batch(*fields) for fields in zip(*parts, strict=True)]

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()
