"""The all-gather of a sharded block matrix in float8 (the tensorwise recipe): one byte per value on
the wire instead of the compute dtype's two (bf16) or four.

Forward, on each rank: cast the stored shard to the compute dtype, take its largest magnitude, reduce
that with MAX over the ranks the gather spans (so every rank scales by the whole matrix's amax, exactly
as one process scaling the gathered matrix would), cast the shard to float8 with that scale, all-gather
the float8 bytes, and hand the block a torchao ``Float8TrainingTensor`` of the gathered matrix. The
matmul then uses it as is: no second cast.

Backward: the matmul's gradient for the matrix arrives in high precision (compute layout); it is
reduced and scattered back to the stored placements in the plan's reduce dtype, as `to_compute` does.

The rowwise recipe scales each row of the matmul's operands separately (by the input dimension, which
the data-parallel gather splits), so its weights are gathered in the compute dtype and cast after.
So are compiled blocks: torch.compile (2.13) cannot trace this function's backward, whose gradient it
types as the float8 subclass of the output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from olmo_fn.parallelize.fp8 import BLOCK_MATRICES, Float8Matmul
from olmo_fn.parallelize.plan import Plan, Rule

FLOAT8_GATHERED = frozenset(f"{sub}.{name}" for sub, names in BLOCK_MATRICES.items() for name in names)
"""Paths (within a block) of the matrices gathered in float8."""


def gathered_axes(stored: DTensor, rule: Rule) -> list[int]:
    """Mesh dimensions over which the compute layout gathers a stored shard (Shard -> Replicate)."""
    return [
        i
        for i, (have, want) in enumerate(zip(stored.placements, rule.compute_placements, strict=True))
        if isinstance(have, Shard) and isinstance(want, Replicate)
    ]


def float8_gather(stored: DTensor, rule: Rule, plan: Plan, matmul: Float8Matmul) -> Any:
    """The compute-layout ``Float8TrainingTensor`` of the block matrix `stored` ``(out, in)``,
    gathered in float8 with one tensorwise scale over the whole (compute-layout) matrix."""
    return _GatherInFloat8.apply(stored, rule, plan, matmul)


class _GatherInFloat8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stored: DTensor, rule: Rule, plan: Plan, matmul: Float8Matmul):
        from torchao.float8.float8_training_tensor import (
            Float8TrainingTensor,
            GemmInputRole,
            hp_tensor_and_scale_to_float8,
        )
        from torchao.float8.float8_utils import amax_to_scale

        mesh = stored.device_mesh
        float8_dtype = matmul.config.cast_config_weight.target_dtype
        shard = stored.to_local().to(plan.compute_dtype)
        amax = shard.abs().amax() if shard.numel() else torch.zeros((), dtype=shard.dtype)
        amax = amax.to(torch.float32)
        for axis in gathered_axes(stored, rule):
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group(axis))
        scale = amax_to_scale(amax, float8_dtype, matmul.config.round_scales_to_power_of_2)
        local = hp_tensor_and_scale_to_float8(shard, scale, float8_dtype, None, GemmInputRole.WEIGHT)
        wire = DTensor.from_local(
            local._data.view(torch.uint8), mesh, stored.placements, shape=stored.shape, stride=stored.stride()
        )
        data = wire.redistribute(mesh, rule.compute_placements).to_local().view(float8_dtype)
        ctx.stored_meta = (mesh, stored.placements, stored.shape, stored.stride(), stored.dtype)
        ctx.rule, ctx.plan = rule, plan
        return Float8TrainingTensor(data, scale, plan.compute_dtype, matmul.mm_config, GemmInputRole.WEIGHT)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mesh, placements, shape, stride, dtype = ctx.stored_meta
        partial = DTensor.from_local(grad.to(ctx.plan.reduce_dtype), mesh, ctx.rule.grad_placements)
        stored_grad = partial.redistribute(mesh, placements).to(dtype)
        assert stored_grad.shape == shape, (stored_grad.shape, shape, stride)
        return stored_grad, None, None, None
