"""Context parallelism computes what one process computes: loss, every gradient, and the parameters
after 3 optimizer steps, in float64 (tolerance 1e-10), alone and with FSDP, HSDP and TP.

Hypothesis draws the documents (one per row, a few, many short ones: most examples have documents
crossing the slice boundaries), sliding windows, and everything `plan_cases.cases` draws. Two negative
controls break the two things CP must get right: the document mask across slices, and the positions
of the keys after the load-balanced gather.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from test_placement_plans import _fixed_case, check

from olmo_fn.parallelize.parallel_config import MeshShape

from plan_cases import cases, examples

CP_SHAPES = {
    2: [MeshShape(1, 1, 1, cp=2)],
    4: [
        MeshShape(1, 1, 1, cp=4),
        MeshShape(1, 2, 1, cp=2),  # CP x FSDP
        MeshShape(1, 1, 2, cp=2),  # CP x TP
        MeshShape(2, 1, 1, cp=2),  # CP x HSDP (replicas)
    ],
}


@given(case=cases(world=2, shapes=CP_SHAPES[2]))
@settings(deadline=None)
def test_context_parallel_on_two_ranks_equals_one_process(pools, case):
    check(pools(2), case)


@given(case=cases(world=4, shapes=CP_SHAPES[4]))
@settings(deadline=None, max_examples=examples(ci=8))
def test_context_parallel_composed_on_four_ranks_equals_one_process(pools, case):
    check(pools(4), case)


@pytest.mark.parametrize("sabotage", ["cp_mask_without_cross_slice_documents", "cp_keys_taken_as_contiguous"])
def test_the_property_catches_a_broken_context_parallel_mask(pools, sabotage):
    """Negative control: the fixed example (documents crossing the slices) passes as built and fails
    with the document mask's cross-slice part dropped, or with the gathered keys' positions wrong."""
    case = _fixed_case(MeshShape(1, 1, 1, cp=2))
    check(pools(2), case)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check(pools(2), case, sabotage)


def _evaluate_on_rank(rank: int, world: int, case):
    import numpy as np
    import torch

    from olmo_fn.evaluate import EvalData, evaluate
    from olmo_fn.graph.param_tree import flatten
    from olmo_fn.parallelize.placed_step import Sharding
    from olmo_fn.parallelize.plan import apply_plan, default_plan

    from plan_cases import _layout, batch, initial_state

    layout = _layout(case.shape)
    plan = default_plan(case.model, case.shape, compute_dtype=torch.float64)
    params = apply_plan(initial_state(case).params, plan, layout.mesh)
    sharding = Sharding.of(plan, layout, list(flatten(params)))
    data = EvalData("val", (batch(case, 0),), np.ones(case.model.vocab_size))
    return evaluate(params, data, case.settings, torch.device("cpu"), sharding)


def test_context_parallel_evaluation_equals_one_process(pools):
    """Held-out evaluation adds up the cp ranks' slices: every rank reports one process's figures."""
    import numpy as np
    import torch

    from olmo_fn.evaluate import EvalData, evaluate

    from plan_cases import batch, initial_state

    case = _fixed_case(MeshShape(1, 1, 1, cp=2))
    data = EvalData("val", (batch(case, 0),), np.ones(case.model.vocab_size))
    want = evaluate(initial_state(case).params, data, case.settings, torch.device("cpu"))
    for got in pools(2).run(_evaluate_on_rank, case):
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-12)
