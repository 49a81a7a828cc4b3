"""Regional compilation: one compiled graph for the transformer block, reused by every layer.

Weights are inputs of the block function, not attributes, so all layers share a graph and compile
time does not grow with depth.
"""

from __future__ import annotations

import torch

from olmo_fn.graph.model import BlockFn


def compile_block(block_fn: BlockFn, *, fullgraph: bool = True) -> BlockFn:
    """`block_fn` under torch.compile (static shapes; `fullgraph` refuses silent graph breaks)."""
    return torch.compile(block_fn, dynamic=False, fullgraph=fullgraph)
