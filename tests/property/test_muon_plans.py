"""Muon under placement plans equals Muon in one process (float64, 3 steps): under FSDP and tensor
parallelism its Newton-Schulz iteration runs on the placed matrices, whose products and norms span the
shards, rather than on each rank's shard alone."""

from __future__ import annotations

import dataclasses

import pytest
from test_placement_plans import _fixed_case

from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.state.optim_config import OptimConfig

from plan_cases import assert_same, reference, run_on_rank

MUON = OptimConfig(name="muon", lr=2e-2, muon_ns_dtype="float64")


def _muon_case(shape: MeshShape, max_grad_norm: float | None):
    case = _fixed_case(shape, n_layers=2, rows=4)
    settings = dataclasses.replace(case.settings, optim=MUON, max_grad_norm=max_grad_norm)
    return dataclasses.replace(case, settings=settings)


@pytest.mark.parametrize(
    ("shape", "max_grad_norm"),
    [
        (MeshShape(1, 2, 1), None),  # FSDP: matrices sharded by rows
        (MeshShape(1, 2, 1), 1e-3),  # ... with clipping that always acts
        (MeshShape(1, 1, 2), None),  # TP: sharded by heads / hidden units
        (MeshShape(2, 1, 1), None),  # replicated
    ],
)
def test_muon_under_a_plan_equals_one_process(pools, shape, max_grad_norm):
    case = _muon_case(shape, max_grad_norm)
    assert_same(pools(2).run(run_on_rank, case)[0], reference(case))


def test_the_property_catches_muon_on_each_shard_alone(pools, monkeypatch):
    """Negative control: orthogonalising each rank's shard on its own (what a local-tensor update
    would do) fails the comparison."""
    case = _muon_case(MeshShape(1, 2, 1), None)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_same(pools(2).run(_shard_local_muon, case)[0], reference(case))


def _shard_local_muon(rank: int, world: int, case):
    import olmo_fn.state.muon as muon

    real = muon.orthogonalise

    def per_shard(g, *args, **kwargs):
        local = g.to_local() if hasattr(g, "to_local") else g
        out = real(local, *args, **kwargs)
        return type(g).from_local(out, g.device_mesh, g.placements) if hasattr(g, "to_local") else out

    muon.orthogonalise = per_shard
    try:
        return run_on_rank(rank, world, case)
    finally:
        muon.orthogonalise = real
