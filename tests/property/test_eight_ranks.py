"""Three-axis plans at 8 ranks equal one process (float64, 1e-10): CP 2 x FSDP 2 x TP 2,
PP 2 x FSDP 2 x TP 2 and PP 2 x HSDP 2 x FSDP 2. A few examples only: 8 processes share the cores."""

from __future__ import annotations

from hypothesis import given, settings
from test_pipeline_parallel import pipeline_cases
from test_placement_plans import check

from olmo_fn.parallelize.parallel_config import MeshShape

from plan_cases import cases


@given(case=cases(world=8, shapes=[MeshShape(1, 2, 2, cp=2)]))
@settings(deadline=None, max_examples=3)
def test_context_parallel_with_fsdp_and_tp_on_eight_ranks_equals_one_process(pools, case):
    check(pools(8), case)


@given(case=pipeline_cases(world=8))
@settings(deadline=None, max_examples=3)
def test_pipeline_with_two_more_axes_on_eight_ranks_equals_one_process(pools, case):
    check(pools(8), case)
