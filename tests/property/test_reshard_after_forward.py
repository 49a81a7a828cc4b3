"""Between forward and backward, a resharded block keeps none of its gathered weights alive (they are
gathered again in backward), where a plain gather keeps every block's until backward."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import olmo_fn.parallelize.compute_layout as compute_layout
from olmo_fn.graph import ModelConfig
from olmo_fn.graph.block import block_for
from olmo_fn.graph.model import hidden_states
from olmo_fn.graph.param_tree import flatten
from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.parallelize.placed_step import Sharding, gathering_block, model_view
from olmo_fn.parallelize.plan import apply_plan, default_plan

from plan_cases import _layout

MODEL = ModelConfig(d_model=16, n_layers=3, n_heads=2, n_kv_heads=2, mlp_hidden=32, vocab_size=20)
SHAPE = MeshShape(1, 2, 1)


def live_block_weights_after_forward(rank: int, world: int, reshard: bool) -> tuple[int, int]:
    """(gathered block weights still alive after the forward pass, block weights gathered)."""
    from olmo_fn.graph.init import init_params

    plan = default_plan(MODEL, SHAPE)
    params = apply_plan(
        init_params(MODEL, seed=0).apply(lambda t: t.requires_grad_(True)), plan, _layout(SHAPE).mesh
    )
    sharding = Sharding.of(plan, _layout(SHAPE), list(flatten(params)))
    gathered: list[weakref.ref] = []
    real = compute_layout.to_compute

    def recording(stored, rule, plan_):
        out = real(stored, rule, plan_)
        if (
            rule.pattern == "*" and stored.dim() == 2 and stored.shape[0] != MODEL.vocab_size
        ):  # block matrices
            gathered.append(weakref.ref(out))
        return out

    compute_layout.to_compute = recording
    try:
        block_fn = gathering_block(block_for(MODEL), sharding, reshard_after_forward=reshard)
        ids = torch.randint(0, MODEL.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank))
        out = hidden_states(model_view(params, sharding), ids, MODEL, block_fn=block_fn).square().sum()
        gc.collect()
        alive = sum(ref() is not None for ref in gathered)
        total = len(gathered)
        out.backward()  # and the resharded blocks gather again, and train
        assert all(p.grad is not None for k, p in flatten(params).items() if k.startswith("blocks."))
    finally:
        compute_layout.to_compute = real
    return alive, total


@pytest.mark.parametrize("reshard", [True, False])
def test_resharded_blocks_hold_no_gathered_weights_between_forward_and_backward(pools, reshard):
    alive, total = pools(2).run(live_block_weights_after_forward, reshard)[0]
    assert total == MODEL.n_layers * 7  # w_q, w_k, w_v, w_out, w1, w2, w3 per block
    assert alive == (0 if reshard else total)
