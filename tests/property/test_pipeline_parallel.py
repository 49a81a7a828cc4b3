"""Pipeline parallelism computes what one process computes: loss, every gradient, and the parameters
after 3 optimizer steps, in float64 (tolerance 1e-10), under every schedule and with FSDP, HSDP and TP.

Hypothesis draws the schedule (GPipe, 1F1B, interleaved 1F1B, looped BFS, interleaved zero bubble,
ZBV), the layer count (uneven splits included), the micro-batch count the schedule allows, and
everything `plan_cases.cases` draws (documents, windows, QK-norm, block kind, clipping, z-loss, the
last stage's loss whole or in chunks).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_placement_plans import _fixed_case, check

from olmo_fn.parallelize.parallel_config import MeshShape, micro_batch_rule
from olmo_fn.parallelize.placed_step import PipelineSpec, Sharding

from plan_cases import STEPS, cases, examples

PP_SHAPES = {
    2: [MeshShape(1, 1, 1, pp=2)],
    4: [
        MeshShape(1, 2, 1, pp=2),  # PP x FSDP
        MeshShape(1, 1, 2, pp=2),  # PP x TP
        MeshShape(2, 1, 1, pp=2),  # PP x HSDP (replicas)
        MeshShape(1, 1, 1, pp=4),
    ],
    8: [MeshShape(1, 2, 2, pp=2), MeshShape(2, 2, 1, pp=2)],
}
STAGES_PER_RANK = {
    "gpipe": 1,
    "1f1b": 1,
    "interleaved-1f1b": 2,
    "looped-bfs": 2,
    "interleaved-zb": 2,
    "zbv": 2,
}


@st.composite
def pipeline_cases(draw, world: int):
    case = draw(cases(world, shapes=PP_SHAPES[world]))
    shape = case.shape
    schedule = draw(st.sampled_from(sorted(STAGES_PER_RANK)))
    per_rank = STAGES_PER_RANK[schedule]
    n_layers = draw(st.integers(shape.pp * per_rank, shape.pp * per_rank + 2))
    micro = draw(st.sampled_from([1, 2]))
    n_micro = draw(
        st.sampled_from(
            [m for m in range(1, 2 * shape.pp + 1) if not micro_batch_rule(schedule, shape.pp, m)]
        )
    )
    rows = shape.dp * micro * n_micro
    seq = case.tokens[0].shape[1]
    gen = np.random.default_rng(case.seed)
    vocab = case.model.vocab_size
    tokens = tuple(
        np.where(gen.random((rows, seq)) < 0.2, case.eos, gen.integers(1, vocab, (rows, seq)))
        for _ in range(STEPS)
    )
    model = dataclasses.replace(case.model, n_layers=n_layers, tie_embeddings=False)
    step_settings = dataclasses.replace(case.settings, model=model, micro_batch_size=micro)
    return dataclasses.replace(
        case, model=model, settings=step_settings, tokens=tokens, pipeline=PipelineSpec(schedule, per_rank)
    )


@given(case=pipeline_cases(world=2))
@settings(deadline=None)
def test_pipeline_on_two_ranks_equals_one_process(pools, case):
    check(pools(2), case)


@given(case=pipeline_cases(world=4))
@settings(deadline=None, max_examples=examples(ci=8))
def test_pipeline_composed_on_four_ranks_equals_one_process(pools, case):
    check(pools(4), case)


def _evaluate_on_rank(rank: int, world: int, case):
    """Forward-only loss sums of the first batch through the pipeline (evaluation's path)."""
    import torch

    from olmo_fn.graph.param_tree import flatten, unflatten
    from olmo_fn.parallelize.plan import apply_plan, default_plan
    from olmo_fn.parallelize.world import rank_paths
    from olmo_fn.state.pipeline_step import make_pipeline_loss_sums_fn

    from plan_cases import _layout, batch, initial_state, rows_of

    layout = _layout(case.shape)
    paths = rank_paths(case.model, layout, case.pipeline)
    plan = default_plan(case.model, case.shape, compute_dtype=torch.float64).for_paths(paths)
    sharding = Sharding.of(plan, layout, paths, case.pipeline)
    full = flatten(initial_state(case).params)
    params = apply_plan(unflatten({p: full[p] for p in paths}), plan, layout.mesh)
    ce, z, n = make_pipeline_loss_sums_fn(case.settings, sharding)(params, rows_of(batch(case, 0), 0, 1))
    return ce.item(), z.item(), n.item()


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b", "interleaved-zb"])
def test_pipeline_evaluation_equals_one_process(pools, schedule):
    """Evaluation's forward-only pass through the stages gives one process's loss sums on every rank."""
    from olmo_fn.state.train_step import make_loss_sums_fn

    from plan_cases import batch, initial_state

    spec = PipelineSpec(schedule, STAGES_PER_RANK[schedule])
    case = _fixed_case(MeshShape(1, 1, 1, pp=2), spec, n_layers=4, rows=4)
    want = [t.item() for t in make_loss_sums_fn(case.settings)(initial_state(case).params, batch(case, 0))]
    for got in pools(2).run(_evaluate_on_rank, case):
        np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("schedule", ["interleaved-zb", "zbv"])
@pytest.mark.parametrize(
    "shape", [MeshShape(1, 1, 1, pp=2), MeshShape(1, 1, 2, pp=2)], ids=["PP 2", "PP 2 x TP 2"]
)
def test_zero_bubble_schedules_with_the_chunked_loss_equal_one_process(pools, schedule, shape):
    """The split backward (inputs, then weights) through the last stage's recomputed loss chunks, with
    and without the vocabulary-parallel loss: a fixed example, beside the drawn ones."""
    spec = PipelineSpec(schedule, STAGES_PER_RANK[schedule])
    case = _fixed_case(shape, spec, n_layers=4, rows=4, loss_chunk_tokens=6)
    check(pools(shape.world), case)


@pytest.mark.parametrize(
    "sabotage", ["pp_loss_sums_not_summed", "pp_grad_norm_not_summed", "pp_loss_chunks_drop_tail"]
)
def test_the_property_catches_a_missing_sum_over_stages(pools, sabotage):
    """Negative control: the fixed example passes under PP 2 and fails when the loss sums, or the
    gradient norm that clipping divides by, are left unsummed over the pipeline stages, or when the
    last stage's chunked loss (2 rows x 8 positions per micro-batch = 6 + 6 + 4) misses its tail."""
    chunks = 6 if sabotage == "pp_loss_chunks_drop_tail" else None
    spec = PipelineSpec("1f1b", 1)
    case = _fixed_case(MeshShape(1, 1, 1, pp=2), spec, n_layers=4, rows=4, loss_chunk_tokens=chunks)
    check(pools(2), case)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check(pools(2), case, sabotage)
