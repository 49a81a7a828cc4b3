"""Expert parallelism: each MoE layer's experts split over the ``ep`` ranks, tokens sent to their owners.

Placement (`olmo_fn.parallelize.plan`, rule ``*.feed_forward.experts.*``): ep rank r holds experts
``r · L .. (r + 1) · L - 1`` (``L = n_experts / ep``) in its compute layout; the router, the shared
expert and every dense weight are replicated there as usual. Expert parallelism is carved out of
``dp_shard``, so each ep rank trains its own rows of the batch.

Forward of one MoE layer on one rank (`expert_parallel_moe`):

1. route the rank's own tokens with the replicated router (and expert bias, if any), as
   `graph.moe.moe_feed_forward` does: this module supplies only its dropless experts;
2. sort its assignments by expert (stable, as `graph.moe.dropless_experts` does), so the rows for
   rank r's experts are contiguous and in rank order; exchange the per-expert row counts with an
   all-to-all, giving each rank the rows it will receive per (source rank, local expert);
3. send the rows with a differentiable all-to-all (`all_to_all`; its backward is the reverse
   all-to-all, so every ep rank's output gradients reach the expert that made the output);
4. regroup the received rows by local expert and run the local experts (`graph.moe.expert_rows_grouped`
   or `expert_rows_loop` on the rank's slices);
5. send the results back with the reverse all-to-all, and combine them with the routing weights
   in the same order as one process does.

The auxiliary sums (`MoeAux`) are those of the rank's own tokens, exactly as one process computes them
for that micro-batch. Dropless only: the capacity path is refused (`expert_parallel_problems`).

Gradients: a rank's expert gradient holds every ep rank's tokens for its experts (complete over ep,
Shard(0)); it is partial over the replicas holding the same experts (dp_replicate, dp_shard / ep),
where the plan's gradient placements sum it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from olmo_fn.errors import ConfigError
from olmo_fn.graph.block import MoeFn, block_for
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.model import BlockFn
from olmo_fn.graph.moe import expert_counts, expert_rows_grouped, expert_rows_loop, moe_feed_forward
from olmo_fn.graph.moe_config import MoeConfig
from olmo_fn.parallelize.axis_group import AxisGroup


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], ep: AxisGroup) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=ep.group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], ep: AxisGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.ep = send, recv, ep
        return _all_to_all(x, send, recv, ep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.ep), None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], ep: AxisGroup) -> torch.Tensor:
    """Rows of x (N, ...) sent over the ep ranks: ``send[r]`` consecutive rows to rank r, ``recv[r]``
    rows received from rank r, concatenated in rank order. Backward: the reverse all-to-all."""
    return _AllToAll.apply(x, send, recv, ep)


def exchange_counts(counts: torch.Tensor, ep: AxisGroup) -> torch.Tensor:
    """counts (ep, L) int64: rows this rank sends to each rank's local experts -> (ep, L): rows this
    rank receives from each rank for each of its local experts (not differentiated)."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=ep.group)
    return received


def expert_slot(experts: torch.Tensor, n_experts: int, ep: int) -> torch.Tensor:
    """Where each assignment goes, as ``owner rank · L + local expert``: the expert index itself, since
    rank r holds experts ``r · L .. (r + 1) · L - 1`` (the plan's Shard(0) over ep)."""
    return experts


def dispatched_experts(
    p: Mapping[str, Any],
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    moe: MoeConfig,
    act,
    grouped: bool,
    ep: AxisGroup,
) -> torch.Tensor:
    """`graph.moe.dropless_experts` with the experts on their ep ranks: p holds this rank's
    ``n_experts / ep`` experts; x (T, d_model) this rank's tokens, weights / experts (T, top_k) their
    routing. Collective over ep (two count-sized and two row-sized all-to-alls, forward and backward)."""
    local = moe.n_experts // ep.size
    slot = expert_slot(experts.reshape(-1), moe.n_experts, ep.size)
    order = torch.argsort(slot, stable=True)
    token = order // moe.top_k
    sent = expert_counts(slot, moe.n_experts).view(ep.size, local)
    received = exchange_counts(sent, ep)
    send, recv = sent.sum(1).tolist(), received.sum(1).tolist()
    xs = all_to_all(x[token], send, recv, ep)
    # Received rows come by source rank, then local expert: regroup them by local expert.
    expert_of_row = (
        torch.arange(local, device=x.device).repeat(ep.size).repeat_interleave(received.reshape(-1))
    )
    regroup = torch.argsort(expert_of_row, stable=True)
    rows = (expert_rows_grouped if grouped else expert_rows_loop)(p, xs[regroup], received.sum(0), act)
    if not sum(recv):  # nothing for this rank's experts: keep them and the received (empty) rows in
        # the graph with zero gradients, so every rank runs the same collectives in backward
        # (each weight's zero gradient a tensor of its own, not a broadcast view clipping cannot scale)
        rows = rows + 0 * xs.sum() + sum((w * 0).sum() for w in p.values())
    back = torch.empty_like(regroup)
    back[regroup] = torch.arange(regroup.numel(), device=x.device)
    rows = all_to_all(rows[back], recv, send, ep)
    rows = rows * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add(0, token, rows)


def expert_parallel_moe(ep: AxisGroup) -> MoeFn:
    """`graph.moe.moe_feed_forward` with its dropless experts computed over `ep` (see the module
    docstring): p's ``experts`` hold this rank's experts; routing and the returned `MoeAux` are this
    rank's tokens', as one process computes them for these rows."""
    dropless = functools.partial(dispatched_experts, ep=ep)

    def moe_fn(p: Mapping[str, Any], x: torch.Tensor, moe: MoeConfig, activation: str = "silu"):
        if moe.capacity_factor:  # the capacity path would run this rank's experts on its own tokens only
            raise ConfigError("parallel.ep > 1 with model.moe.capacity_factor > 0 is not supported yet")
        return moe_feed_forward(p, x, moe, activation, dropless=dropless)

    return moe_fn


def expert_parallel_block(cfg: ModelConfig, ep: AxisGroup) -> BlockFn:
    """The block `cfg.block` names, its MoE feed-forward over the ep ranks' experts."""
    return functools.partial(block_for(cfg), moe_fn=expert_parallel_moe(ep))
