"""Expert parallelism equals one process: loss, every gradient and the parameters after 3 AdamW steps
in float64 (tolerance 1e-10, relative and absolute), and the moe/* metrics (float32 statistics by
design: 1e-6), on olmoe-tiny shrunk (2
layers, d_model 32, 4 experts, top 2; hypothesis varies the rest) with random tokens.

Plans: EP 2 at world 2; EP 2 x FSDP 2, EP 2 x HSDP 2 and EP 4 at world 4. The balancing loss is
computed per micro-batch on each rank (its own tokens), so the one-process reference's micro-batches
must hold exactly the rows a rank's micro-batches hold: every example's micro-batch size divides the
rows per data-parallel rank, so the reference's consecutive micro-batches of the global batch are the
ranks' micro-batches, one for one (`Batch.split` of the global batch vs of each rank's contiguous
share, `plan_cases.rows_of`). With a few tokens per rank, experts often receive no tokens from a rank,
or none at all; `test_experts_without_tokens_on_a_rank` asserts that it happened.

Negative controls (each must fail the comparison): expert gradients not summed over the data-parallel
replicas holding the same experts; tokens sent to the wrong rank (ownership taken as ``expert % ep``
while ranks hold contiguous experts); the balancing loss taken over the ep group's assignments instead
of the rank's own tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from olmo_fn.graph import get_preset
from olmo_fn.graph.param_tree import flatten
from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.parallelize.placed_step import Sharding
from olmo_fn.parallelize.plan import apply_plan, default_plan
from olmo_fn.state.optim import init_opt_state
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_state import TrainState
from olmo_fn.state.train_step import StepSettings, make_gradient_fn, make_train_step

from plan_cases import (
    EOS,
    STEPS,
    Case,
    _everyones,
    _layout,
    assert_same,
    batch,
    examples,
    initial_state,
    rows_of,
    step_settings,
    token_batches,
)
from rank_pool import RankPool

SHAPES = {
    2: [MeshShape(1, 2, 1, ep=2)],
    4: [MeshShape(1, 4, 1, ep=2), MeshShape(2, 2, 1, ep=2), MeshShape(1, 4, 1, ep=4)],
}
"""EP 2; EP 2 x FSDP 2, EP 2 x HSDP 2 (dp_replicate 2), EP 4."""
MOE_METRICS = ("moe/lb_loss", "moe/router_z_loss", "moe/load_max", "moe/load_min", "moe/dropped")


def tiny_moe(**changes) -> object:
    """olmoe-tiny shrunk: 2 layers, d_model 32, 4 heads, 4 experts of width 16, top 2."""
    base = get_preset("olmoe-tiny")
    moe = dataclasses.replace(
        base.moe, **({"n_experts": 4, "top_k": 2, "hidden": 16} | changes.pop("moe", {}))
    )
    model = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=24, vocab_size=40, moe=moe)
    return dataclasses.replace(base, **(model | changes))


@st.composite
def ep_cases(draw, world: int) -> Case:
    shape = draw(st.sampled_from(SHAPES[world]))
    moe = dict(
        shared_hidden=draw(st.sampled_from([0, 8])),
        score=draw(st.sampled_from(["softmax", "sigmoid"])),
        normalize_top_k=draw(st.booleans()),
        every=draw(st.sampled_from([1, 2])),
        lb_loss=draw(st.sampled_from([0.01, 0.5])),
        router_z_loss=draw(st.sampled_from([0.0, 0.01])),
        bias_rate=draw(st.sampled_from([0.0, 0.05])),  # an expert bias steering the choice
    )
    model = tiny_moe(
        moe=moe,
        block=draw(st.sampled_from(["reordered_norm", "pre_norm"])),
        qk_norm=draw(st.booleans()),
        mlp_activation=draw(st.sampled_from(["silu", "gelu_tanh"])),
    )
    per_rank = draw(st.integers(1, 2))
    rows, seq = shape.dp * per_rank, draw(st.integers(2, 5))
    micro = draw(st.sampled_from([m for m in (1, 2) if per_rank % m == 0]))  # divides each rank's rows
    tokens, seed = draw(token_batches(model, rows, seq, eos_rate=draw(st.sampled_from([0.0, 0.3]))))
    settings_ = draw(step_settings(model, micro, ac=draw(st.sampled_from(["none", "full", "selective"]))))
    return Case(model, settings_, tokens, EOS, shape, seed)


def reference(case: Case) -> dict:
    """One process, no plan: gradients of step 0's batch, then 3 steps' losses, norms, moe metrics.
    On one intra-op thread, as the pool's ranks (tiny shapes; two threads on two busy cores are ~30x
    slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(case)
    finally:
        torch.set_num_threads(threads)


def _reference(case: Case) -> dict:
    grads = make_gradient_fn(case.settings)(initial_state(case).params, batch(case, 0)).grads
    step_fn, state, losses, norms, moe = make_train_step(case.settings), initial_state(case), [], [], []
    for step in range(STEPS):
        state, metrics = step_fn(state, batch(case, step))
        losses.append(metrics["loss"].item())
        norms.append(metrics["grad_norm"].item())
        moe.append([float(metrics[k]) for k in MOE_METRICS])
    return {
        "grads": {k: v.detach().numpy() for k, v in grads.items()},
        "losses": losses,
        "grad_norms": norms,
        "moe": moe,
        "params": {k: v.detach().numpy() for k, v in flatten(state.params).items()},
    }


def _recording_counts(seen: list):
    """Record every (ep, local experts) matrix of rows a rank receives."""
    import olmo_fn.parallelize.expert_parallel as ep

    real = ep.exchange_counts

    def recording(counts, group):
        received = real(counts, group)
        seen.append(received.clone())
        return received

    ep.exchange_counts = recording
    return lambda: setattr(ep, "exchange_counts", real)


def _expert_grads_not_summed(shape: MeshShape):
    """An expert's gradient taken as complete on each rank: not summed over the replicas holding it."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    import olmo_fn.parallelize.plan as plan

    real = plan.Rule.grad_placements
    plan.Rule.grad_placements = property(
        lambda rule: real.fget(rule) if rule.ep is None else (Replicate(), Replicate(), Shard(0), Partial())
    )
    return lambda: setattr(plan.Rule, "grad_placements", real)


def _tokens_to_wrong_rank(shape: MeshShape):
    """Senders take expert e to live on rank ``e % ep`` (local index ``e // ep``), while each rank
    holds a contiguous block of experts: tokens reach the wrong experts."""
    import olmo_fn.parallelize.expert_parallel as ep

    real = ep.expert_slot

    def interleaved(experts, n_experts, size):
        return (experts % size) * (n_experts // size) + experts // size

    ep.expert_slot = interleaved
    return lambda: setattr(ep, "expert_slot", real)


def _aux_over_ep_group(shape: MeshShape):
    """The balancing loss's expert loads counted over the whole ep group's assignments instead of the
    rank's own tokens (with the rank's own routing probabilities)."""
    import torch.distributed as dist

    import olmo_fn.graph.moe as moe_module

    real = moe_module.balancing_sums
    group = _layout(shape).ep_group

    def over_group(logits, experts, moe):
        _, z_sum, counts = real(logits, experts, moe)
        total = counts.clone()
        dist.all_reduce(total, group=group)
        probs = torch.softmax(logits, -1) if moe.score == "softmax" else torch.sigmoid(logits)
        probs = probs / probs.sum(-1, keepdim=True)
        n = logits.shape[0]
        return moe.n_experts * (total / n * probs.mean(0)).sum() * n, z_sum, total

    moe_module.balancing_sums = over_group
    return lambda: setattr(moe_module, "balancing_sums", real)


SABOTAGE = {
    "expert_grads_not_summed": _expert_grads_not_summed,
    "tokens_to_wrong_rank": _tokens_to_wrong_rank,
    "aux_over_ep_group": _aux_over_ep_group,
}


def run_on_rank(rank: int, world: int, case: Case, sabotage: str | None = None) -> dict | None:
    """`reference` under the default plan for `case.shape` (experts on the expert mesh); rank 0 returns
    the results, and what the ranks' experts received."""
    seen: list[torch.Tensor] = []
    undo = [_recording_counts(seen)] + ([SABOTAGE[sabotage](case.shape)] if sabotage else [])
    try:
        layout = _layout(case.shape)
        plan = default_plan(case.model, case.shape, compute_dtype=torch.float64)
        full = initial_state(case).params
        sharding = Sharding.of(plan, layout, list(flatten(full)))
        params = apply_plan(full, plan, layout.mesh, layout.expert_mesh)
        state = TrainState(0, params, init_opt_state(params, case.settings.optim), 0, 0)
        share = functools.partial(rows_of, index=layout.dp_rank, parts=case.shape.dp)
        grads = make_gradient_fn(case.settings, sharding)(state.params, share(batch(case, 0))).grads
        full_grads = _everyones({k: v.full_tensor().detach().numpy() for k, v in grads.items()})
        step_fn, losses, norms, moe = make_train_step(case.settings, sharding), [], [], []
        for step in range(STEPS):
            state, metrics = step_fn(state, share(batch(case, step)))
            losses.append(metrics["loss"].item())
            norms.append(metrics["grad_norm"].item())
            moe.append([float(metrics[k]) for k in MOE_METRICS])
        params = _everyones({k: v.full_tensor().detach().numpy() for k, v in flatten(state.params).items()})
    finally:
        for restore in reversed(undo):
            restore()
    received = _everyones({f"{rank}": [r.tolist() for r in seen]})
    if rank != 0:
        return None
    matrices = [np.array(m) for per_rank in received.values() for m in per_rank]
    return {
        "grads": full_grads,
        "losses": losses,
        "grad_norms": norms,
        "moe": moe,
        "params": params,
        "none_from_a_rank": any((m == 0).any() for m in matrices),
        "idle_expert": any((m.sum(0) == 0).any() for m in matrices),
        "idle_rank": any(m.sum() == 0 for m in matrices),
    }


def assert_equal_to_one_process(got: dict, want: dict) -> None:
    """`plan_cases.assert_same` (1e-10), and the moe/* metrics to 1e-6: they are made from float32
    statistics (`moe_terms.add_stats`), summed over ranks in another order than one process sums them."""
    assert_same(got, want)
    np.testing.assert_allclose(got["moe"], want["moe"], rtol=1e-6, atol=1e-7, err_msg="moe metrics")


def check(pool: RankPool, case: Case, sabotage: str | None = None) -> dict:
    got = pool.run(run_on_rank, case, sabotage)[0]
    assert_equal_to_one_process(got, reference(case))
    return got


@given(case=ep_cases(world=2))
@settings(deadline=None, max_examples=examples(ci=10))
def test_ep_on_two_ranks_equals_one_process(pools, case):
    check(pools(2), case)


@given(case=ep_cases(world=4))
@settings(deadline=None, max_examples=examples(ci=4))
def test_ep_with_fsdp_on_four_ranks_equals_one_process(pools, case):
    check(pools(4), case)


def fixed_case(shape: MeshShape, rows_per_rank: int = 1, seq: int = 3, seed: int = 5) -> Case:
    """A fixed example: few tokens per rank (experts go without), weighty balancing loss."""
    model = tiny_moe(moe=dict(lb_loss=0.5, router_z_loss=0.01, shared_hidden=8))
    settings_ = StepSettings(
        model, OptimConfig(lr=1e-2), ScheduleConfig(warmup_steps=1), STEPS, 1, torch.float64, z_loss=1e-3
    )
    gen = np.random.default_rng(seed)
    rows = shape.dp * rows_per_rank
    tokens = tuple(gen.integers(1, model.vocab_size, (rows, seq)) for _ in range(STEPS))
    return Case(model, settings_, tokens, EOS, shape, seed)


@pytest.mark.parametrize("shape", [MeshShape(1, 2, 1, ep=2), MeshShape(1, 4, 1, ep=4)], ids=str)
def test_experts_without_tokens_on_a_rank(pools, shape):
    """Experts that get no rows from some rank, and (EP 4: one expert per rank) ranks whose experts get
    none at all, still equal one process; the example is built so that both happen."""
    got = check(pools(shape.world), fixed_case(shape, seq=2))
    assert got["none_from_a_rank"] and got["idle_expert"]
    if shape.ep == shape.dp_shard == 4:
        assert got["idle_rank"]


@pytest.mark.parametrize(
    ("sabotage", "shape"),
    [
        ("expert_grads_not_summed", MeshShape(1, 4, 1, ep=2)),  # EP 2 x FSDP 2: two replicas per expert
        ("expert_grads_not_summed", MeshShape(2, 2, 1, ep=2)),  # EP 2 x HSDP 2
        ("tokens_to_wrong_rank", MeshShape(1, 2, 1, ep=2)),
        ("aux_over_ep_group", MeshShape(1, 2, 1, ep=2)),
    ],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_the_property_catches_expert_parallel_bugs(pools, sabotage, shape):
    """Negative control: the fixed example passes as built and fails with the bug switched on."""
    case = fixed_case(shape)
    check(pools(shape.world), case)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check(pools(shape.world), case, sabotage)
