"""Regional compilation: the compiled block gives the eager step's numbers (one compile per run)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from olmo_fn.graph import init_params
from olmo_fn.graph.block import block_for
from olmo_fn.graph.model import hidden_states
from olmo_fn.graph.param_tree import flatten
from olmo_fn.graph.presets import PRESETS
from olmo_fn.io.instances import make_batch
from olmo_fn.parallelize.compile import compile_block
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_state import init_train_state
from olmo_fn.state.train_step import StepSettings, make_train_step

pytestmark = pytest.mark.compile


def test_compiled_block_matches_eager(gen):
    cfg = dataclasses.replace(PRESETS["olmo2-tiny"], n_layers=2)
    base = StepSettings(cfg, OptimConfig(), ScheduleConfig(warmup_steps=1), total_steps=3, micro_batch_size=2)
    tokens = torch.randint(0, 258, (4, 64), generator=gen)
    tokens[:, 20] = 256  # a document boundary, so the document mask is exercised
    batch = make_batch(tokens, eos=256)
    runs = []
    for compiled in (False, True):
        step_fn = make_train_step(dataclasses.replace(base, compile=compiled))
        state = init_train_state(cfg, seed=0, device="cpu")
        losses = []
        for _ in range(3):
            state, metrics = step_fn(state, batch)
            losses.append(metrics["loss"].item())
        runs.append((losses, flatten(state.params)))
    (eager_losses, eager_params), (comp_losses, comp_params) = runs
    assert comp_losses == pytest.approx(eager_losses, rel=1e-5)
    for k in eager_params:
        # Adam turns last-bit gradient differences of near-zero gradients into steps of ~lr.
        torch.testing.assert_close(comp_params[k], eager_params[k], atol=2e-4, rtol=1e-3)


def test_compiled_block_traces_flex_attention_without_graph_breaks(gen):
    """The CUDA path (FlexAttention + BlockMask inside the compiled block, fullgraph) — forward on CPU."""
    cfg = dataclasses.replace(PRESETS["olmo2-tiny"], n_layers=2)
    params = init_params(cfg, seed=0)
    ids = torch.randint(0, 256, (2, 256), generator=gen)
    doc_ids = torch.zeros(2, 256, dtype=torch.long)
    doc_ids[:, 100:] = 1
    doc_ids[1, 200:] = 2
    with torch.no_grad():
        compiled = hidden_states(
            params, ids, cfg, doc_ids=doc_ids, backend="flex", block_fn=compile_block(block_for(cfg))
        )
        dense = hidden_states(params, ids, cfg, doc_ids=doc_ids, backend="sdpa")
    torch.testing.assert_close(compiled, dense, atol=1e-4, rtol=1e-4)
