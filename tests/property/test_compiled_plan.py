"""A compiled block under FSDP gathers its own parameters inside its graph: the forward graph holds the
all-gather, the backward graph the reduce-scatter, and training gives the eager numbers."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from olmo_fn.graph import ModelConfig
from olmo_fn.graph.block import block_for
from olmo_fn.graph.model import loss_sums
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.instances import make_batch
from olmo_fn.parallelize.parallel_config import MeshShape
from olmo_fn.parallelize.placed_step import Sharding, gathering_block, model_view
from olmo_fn.parallelize.plan import apply_plan, default_plan
from olmo_fn.state.adamw import init_adamw_state
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_state import TrainState, init_train_state
from olmo_fn.state.train_step import StepSettings, make_train_step

from plan_cases import _layout

pytestmark = pytest.mark.compile
MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=48, vocab_size=40)
SHAPE = MeshShape(1, 2, 1)


def _placed(rank: int):
    plan = default_plan(MODEL, SHAPE)
    state = init_train_state(MODEL, seed=0, device="cpu")
    params = apply_plan(state.params, plan, _layout(SHAPE).mesh)
    sharding = Sharding.of(plan, _layout(SHAPE), list(flatten(params)))
    return TrainState(0, params, init_adamw_state(params), 0, 0), sharding


def _batch(rank: int, step: int):
    tokens = torch.randint(
        0, MODEL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank)
    )
    return make_batch(tokens, eos=0)


def collectives_in_compiled_graphs(rank: int, world: int) -> dict[str, list[str]]:
    """The collective ops AOTAutograd puts into the forward and backward graphs of the compiled block."""
    seen: dict[str, list[str]] = {"forward": [], "backward": [], "graphs": []}

    def recorder(kind):
        def compile_graph(gm, example_inputs):
            seen["graphs"].append(kind)
            seen[kind] += [str(n.target) for n in gm.graph.nodes if "_c10d_functional" in str(n.target)]
            return gm.forward

        return compile_graph

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    state, sharding = _placed(rank)
    block_fn = torch.compile(
        gathering_block(block_for(MODEL), sharding, checkpointing="none"),
        backend=backend,
        fullgraph=True,
    )
    batch = _batch(rank, 0)
    ce, _, _ = loss_sums(
        model_view(state.params, sharding), batch.input_ids, batch.labels, MODEL, block_fn=block_fn
    )
    ce.backward()
    return seen


def losses(rank: int, world: int, compiled: bool) -> list[float]:
    settings = StepSettings(
        MODEL, OptimConfig(lr=1e-2), ScheduleConfig(warmup_steps=1), 3, 2, compile=compiled
    )
    state, sharding = _placed(rank)
    step_fn, out = make_train_step(settings, sharding), []
    for step in range(3):
        state, metrics = step_fn(state, _batch(rank, step))
        out.append(metrics["loss"].item())
    return out


def test_the_compiler_sees_the_gather_and_the_reduce_scatter(pools):
    seen = pools(2).run(collectives_in_compiled_graphs)[0]
    assert any("all_gather_into_tensor" in op for op in seen["forward"]), seen
    assert any("reduce_scatter_tensor" in op for op in seen["backward"]), seen
    assert seen["graphs"] == ["forward", "backward"]  # one graph serves both layers


def test_compiled_fsdp_trains_like_eager(pools):
    eager = pools(2).run(losses, False)[0]
    compiled = pools(2).run(losses, True, timeout=600)[0]
    assert compiled == pytest.approx(eager, rel=1e-5)


@pytest.mark.parametrize("shape", [MeshShape(1, 1, 1, cp=2), MeshShape(1, 1, 1, pp=2)], ids=["CP 2", "PP 2"])
def test_compiled_context_and_pipeline_parallel_equal_one_process(pools, shape):
    """Compiled blocks under CP (the key/value all-gather inside the graph) and inside pipeline
    stages give one eager process's loss, gradients and parameters (float64, 1e-10)."""
    import dataclasses

    from test_placement_plans import _fixed_case

    from olmo_fn.parallelize.placed_step import PipelineSpec

    from plan_cases import assert_same, reference, run_on_rank

    pipeline = PipelineSpec("1f1b", 1) if shape.pp > 1 else None
    case = _fixed_case(shape, pipeline, n_layers=2, rows=4)
    compiled = dataclasses.replace(case, settings=dataclasses.replace(case.settings, compile=True))
    assert_same(pools(2).run(run_on_rank, compiled, None, timeout=600)[0], reference(case))
