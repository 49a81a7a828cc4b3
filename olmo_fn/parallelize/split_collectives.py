"""Differentiable all-gather and reduce-scatter of a tensor split along one dimension over one mesh
axis (sequence parallel's positions, context parallel's keys and values).

Each is the other's backward: a gathered tensor that every rank uses for its own part of the work has
a gradient that is partial on each rank, summed and split back (reduce-scatter); a partial sum that
is reduce-scattered gets back the gathered gradient. Written with the list forms of gloo's and NCCL's
collectives, eagerly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from olmo_fn.parallelize.axis_group import AxisGroup


def _all_gather(x: torch.Tensor, axis: AxisGroup, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(axis.size)]
    dist.all_gather(parts, x.contiguous(), group=axis.group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, axis: AxisGroup, dim: int) -> torch.Tensor:
    parts = [part.contiguous() for part in x.chunk(axis.size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=axis.group)
    return out


class _GatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, axis: AxisGroup, dim: int) -> torch.Tensor:
        ctx.axis, ctx.dim = axis, dim
        return _all_gather(x, axis, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.axis, ctx.dim), None, None


class _ReduceScatterAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, axis: AxisGroup, dim: int) -> torch.Tensor:
        ctx.axis, ctx.dim = axis, dim
        return _reduce_scatter(x, axis, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.axis, ctx.dim), None, None


def gather_along(x: torch.Tensor, axis: AxisGroup, dim: int) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` in rank order (size along `dim` times axis.size)."""
    return _GatherAlong.apply(x, axis, dim)


def reduce_scatter_along(x: torch.Tensor, axis: AxisGroup, dim: int) -> torch.Tensor:
    """`x` summed over the ranks, this rank keeping its chunk along `dim` (size / axis.size)."""
    return _ReduceScatterAlong.apply(x, axis, dim)
