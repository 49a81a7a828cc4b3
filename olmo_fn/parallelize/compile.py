"""Regional compilation: one compiled graph for the transformer block, reused by every layer.

Weights are inputs of the block function, not attributes, so all layers share a graph and compile
time does not grow with depth.
"""

from __future__ import annotations

import functools

import torch

from olmo_fn.graph.model import BlockFn


def compile_block(
    block_fn: BlockFn, *, fullgraph: bool = True, memory_budget: float | None = None
) -> BlockFn:
    """`block_fn` under torch.compile (static shapes; `fullgraph` refuses silent graph breaks).

    memory_budget: a fraction in (0, 1]: the partitioner keeps at most that share of the activations
    an uncheckpointed block keeps, and recomputes the rest in backward (its choice of what, by cost).
    """
    compiled = torch.compile(block_fn, dynamic=False, fullgraph=fullgraph)
    if memory_budget is None:
        return compiled

    @functools.wraps(block_fn)
    def within_budget(*args, **kwargs):
        # The partitioner reads the budget when it compiles (on the first call, and on any recompile).
        with torch._functorch.config.patch(activation_memory_budget=memory_budget):
            return compiled(*args, **kwargs)

    return within_budget
