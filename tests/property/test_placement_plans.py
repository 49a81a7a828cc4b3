"""Every placement plan computes what one process computes: loss, every gradient, and the parameters
after 3 optimizer steps, in float64 (tolerance 1e-10, relative and absolute).

Hypothesis draws the model (heads, kv-heads, head size, layers, vocabulary, MLP width, QK-norm,
block kind, sliding windows, tied embeddings), the batches (one document per row, a few, or many
short ones), the step settings (micro-batches, z-loss, clipping that acts or not, document masking)
and a plan from every supported combination at the world size: FSDP, HSDP, TP, FSDP x TP, HSDP x TP.
The `nightly` hypothesis profile runs many more examples.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings

from olmo_fn.graph import ModelConfig
from olmo_fn.parallelize.parallel_config import MeshShape

from plan_cases import STEPS, Case, assert_same, cases, examples, reference, run_on_rank
from rank_pool import RankPool


def check(pool: RankPool, case: Case, sabotage: str | None = None) -> None:
    got = pool.run(run_on_rank, case, sabotage)[0]
    assert_same(got, reference(case))


@given(case=cases(world=2))
@settings(deadline=None)
def test_plans_on_two_ranks_equal_one_process(pools, case):
    check(pools(2), case)


@given(case=cases(world=4))
@settings(deadline=None, max_examples=examples(ci=8))
def test_plans_on_four_ranks_equal_one_process(pools, case):
    check(pools(4), case)


def _fixed_case(
    shape: MeshShape, pipeline=None, n_layers: int = 1, rows: int = 2, loss_chunk_tokens: int | None = None
) -> Case:
    """A fixed example with QK-norm and the OLMo 2 block, under `shape` (and `pipeline`)."""
    import numpy as np
    import torch

    from olmo_fn.state.optim_config import OptimConfig
    from olmo_fn.state.schedule import ScheduleConfig
    from olmo_fn.state.train_step import StepSettings

    model = ModelConfig(d_model=8, n_layers=n_layers, n_heads=2, n_kv_heads=2, mlp_hidden=4, vocab_size=12)
    settings_ = StepSettings(
        model, OptimConfig(lr=1e-2), ScheduleConfig(warmup_steps=1), STEPS, 2, torch.float64
    )
    settings_ = dataclasses.replace(settings_, loss_chunk_tokens=loss_chunk_tokens)
    gen = np.random.default_rng(0)
    tokens = tuple(gen.integers(0, 12, (rows, 8)) for _ in range(STEPS))
    return Case(model, settings_, tokens, 0, shape, seed=3, pipeline=pipeline)


@pytest.mark.parametrize(
    ("sabotage", "shape"),
    [
        ("missing_qk_norm_reduction", MeshShape(1, 1, 2)),  # TP: QK-norm statistic's gradient
        ("norm_grads_not_summed", MeshShape(1, 1, 2)),  # TP + SP: norm weights see a slice each
        ("data_parallel_grads_not_summed", MeshShape(1, 2, 1)),  # FSDP: each rank's own data
        ("grad_norm_counts_copies", MeshShape(1, 1, 2)),  # clipping by a norm counting replicas twice
        ("tp_loss_chunks_drop_tail", MeshShape(1, 1, 2)),  # chunked vocab-parallel loss: 16 = 2 x 6 + 4
    ],
)
def test_the_property_catches_a_missing_reduction(pools, sabotage, shape):
    """Negative control: the same example passes as built and fails with one reduction left out (or
    done once too often), or with the chunked loss missing its last, shorter chunk."""
    case = _fixed_case(shape, loss_chunk_tokens=6 if sabotage.startswith("tp_loss_chunks") else None)
    check(pools(2), case)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check(pools(2), case, sabotage)
