"""`--compile step`: the whole update compiled as one graph equals the eager step (float64), and the
combinations it cannot run are refused before anything starts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train_step import random_batch, settings, state64

from olmo_fn.config import TrainConfig
from olmo_fn.errors import ConfigError
from olmo_fn.graph.param_tree import flatten
from olmo_fn.parallelize.parallel_config import ParallelConfig
from olmo_fn.state.train_step import make_train_step


@pytest.mark.compile
def test_whole_step_graph_equals_eager_steps(gen):
    """Three float64 steps (document masks, ignored targets, z-loss, clipping, weight decay): losses, gradient norms and every parameter and moment as the eager step."""
    batches = [random_batch(gen, ignore_frac=0.2) for _ in range(3)]
    s = settings(micro_batch_size=8)  # one micro-batch: a graph half the size compiles in half the time
    eager, compiled = make_train_step(s), make_train_step(dataclasses.replace(s, compile_step=True))
    a, b = state64(), state64()
    for batch in batches:
        a, ma = eager(a, batch)
        b, mb = compiled(b, batch)
        for key in ("loss", "z_loss", "grad_norm", "n_targets"):
            torch.testing.assert_close(mb[key], ma[key], rtol=1e-10, atol=1e-12, msg=key)
    for tree in ("params", "opt_state"):
        fa, fb = flatten(getattr(a, tree)), flatten(getattr(b, tree))
        for path in fa:
            torch.testing.assert_close(fb[path], fa[path], rtol=1e-10, atol=1e-12, msg=f"{tree}.{path}")
    assert b.step == 3 and b.tokens_seen == a.tokens_seen


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"ac": "full"}, "compile=step with ac=full"),
        ({"fp8": "tensorwise"}, "compile=step with fp8"),
        ({"parallel": ParallelConfig(tp=2)}, "compile=step runs in one process"),
    ],
)
def test_what_the_whole_step_graph_cannot_run_is_refused(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(compile="step", **fields)
