"""Between forward and backward, resharded blocks keep at most about one block's gathered weights (they
are gathered again in backward), where a plain gather keeps every block's until backward.

Measured as the process's resident memory after the forward pass: the gathered weights here are
large (each a separate allocation the C allocator maps and unmaps whole), the activations small.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from olmo_fn.graph import ModelConfig
from olmo_fn.graph.block import block_for
from olmo_fn.graph.init import init_params
from olmo_fn.graph.model import hidden_states
from olmo_fn.graph.param_tree import flatten, param_shapes
from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.parallelize.placed_step import Sharding, gathering_block, model_view
from olmo_fn.parallelize.plan import apply_plan, default_plan

from plan_cases import _layout

MODEL = ModelConfig(d_model=512, n_layers=3, n_heads=4, n_kv_heads=4, mlp_hidden=2048, vocab_size=64)
SHAPE = MeshShape(1, 2, 1)
BLOCK_BYTES = 4 * sum(
    torch.Size(s).numel() for p, s in param_shapes(MODEL).items() if p.startswith("blocks.") and len(s) == 2
)
"""Bytes of every block's gathered fp32 matrices (3 blocks: about 50 MB)."""


def _fixed_mmap_threshold() -> None:
    """Make glibc map every allocation of 64 KiB or more on its own and unmap it when freed (by
    default the threshold grows after such frees, and freed memory stays resident)."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def retained_by_forward(rank: int, world: int, reshard: bool) -> int:
    """Resident bytes the forward pass leaves behind until backward."""
    _fixed_mmap_threshold()
    plan = default_plan(MODEL, SHAPE)
    params = apply_plan(
        init_params(MODEL, seed=0).apply(lambda t: t.requires_grad_(True)), plan, _layout(SHAPE).mesh
    )
    sharding = Sharding.of(plan, _layout(SHAPE), list(flatten(params)))
    block_fn = gathering_block(block_for(MODEL), sharding, checkpointing="selective" if reshard else "none")
    ids = torch.randint(0, MODEL.vocab_size, (1, 8), generator=torch.Generator().manual_seed(rank))
    view = model_view(params, sharding)
    gc.collect()
    before = _resident_bytes()
    out = hidden_states(view, ids, MODEL, block_fn=block_fn).square().sum()
    gc.collect()
    retained = _resident_bytes() - before
    out.backward()  # the resharded blocks gather again, and every block gets its gradients
    assert all(p.grad is not None for k, p in flatten(params).items() if k.startswith("blocks."))
    return retained


@pytest.mark.parametrize("reshard", [True, False])
def test_resharded_blocks_hold_at_most_one_blocks_weights_between_forward_and_backward(pools, reshard):
    retained = pools(2).run(retained_by_forward, reshard)[0]
    if reshard:  # at most about one block's worth (the issue's bound), not the three blocks'
        assert retained < 1.1 * BLOCK_BYTES / MODEL.n_layers, (retained, BLOCK_BYTES)
    else:  # the control: the measurement sees the gathered weights when they are kept
        assert retained > 0.8 * BLOCK_BYTES, (retained, BLOCK_BYTES)
