"""Choosing the optimizer: Lion and Muon train the tiny model, resume bit-exactly after SIGKILL,
record their state layout in checkpoints, and a resume with another optimizer is refused unless asked
for (then the parameters carry over and the new optimizer's state starts at zero). Muon under
placement plans: tests/property/test_muon_plans.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_crash_resume import ARGS, STEPS, losses, run

from olmo_fn.graph.param_tree import flatten
from olmo_fn.graph.presets import get_preset
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.run import main
from olmo_fn.state.checkpoint import latest_checkpoint, load_checkpoint
from olmo_fn.state.optim import init_opt_state
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.train_state import empty_train_state

LRS = {"adamw": "4e-3", "lion": "1e-3", "muon": "1e-2"}


def _train(run_dir: Path, name: str, *extra: str) -> list[str]:
    return ["train", *ARGS, "--optim.name", name, "--optim.lr", LRS[name], "--run-dir", str(run_dir), *extra]


@pytest.mark.parametrize("name", ["lion", "muon"])
def test_optimizer_trains_and_resumes_bit_exactly_after_sigkill(isolated_cache, tmp_path, name):
    whole = tmp_path / "whole"
    proc = run(_train(whole, name, "--checkpoint.interval", "3"), isolated_cache)
    assert proc.returncode == 0, proc.stderr
    expected = losses(whole)
    assert len(expected) == STEPS
    assert sum(expected[-3:]) / 3 < expected[0] - 0.3, expected  # the loss falls

    crashed = tmp_path / "crashed"
    args = _train(crashed, name, "--checkpoint.interval", "3")
    proc = run(args, isolated_cache, crash=("after-step", 7))
    assert proc.returncode != 0
    proc = run(args, isolated_cache)
    assert proc.returncode == 0, proc.stderr
    assert losses(crashed) == expected  # a resume drops the metrics after its checkpoint

    state = _load(latest_checkpoint(crashed), OptimConfig(name=name))
    final = _load(latest_checkpoint(whole), OptimConfig(name=name))
    for key, value in flatten(final.opt_state).items():
        assert torch.equal(flatten(state.opt_state)[key], value), key


MODEL = dataclasses.replace(
    get_preset("olmo2-tiny"), d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=128
)
"""The model ARGS trains."""


def _load(path, optim: OptimConfig):
    return load_checkpoint(path, empty_train_state(MODEL, device="cpu", optim=optim))


def test_state_layouts_differ_by_optimizer():
    """Muon keeps one momentum per block matrix and two AdamW moments for every other leaf; Lion one
    momentum per leaf: each covers every parameter exactly once per moment it keeps."""
    from olmo_fn.graph.init import init_params
    from olmo_fn.graph.presets import get_preset

    params = init_params(get_preset("olmo2-tiny"), seed=0)
    paths = set(flatten(params))
    matrices = {p for p, t in flatten(params).items() if p.startswith("blocks.") and t.ndim == 2}
    adamw = init_opt_state(params, OptimConfig(name="adamw"))
    assert set(adamw.keys()) == {"exp_avg", "exp_avg_sq"}
    assert set(flatten(adamw["exp_avg"])) == set(flatten(adamw["exp_avg_sq"])) == paths
    lion = init_opt_state(params, OptimConfig(name="lion"))
    assert set(lion.keys()) == {"exp_avg"} and set(flatten(lion["exp_avg"])) == paths
    muon = init_opt_state(params, OptimConfig(name="muon"))
    assert set(flatten(muon["momentum"])) == matrices
    assert set(flatten(muon["exp_avg"])) == paths - matrices


def test_resuming_with_another_optimizer_is_refused_unless_asked_for(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_train(run_dir, "adamw", "--steps", "4", "--checkpoint.interval", "2")) == 0
    capsys.readouterr()
    assert main(_train(run_dir, "lion", "--steps", "6")) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.name" in err and "--allow-config-change" in err and len(err.splitlines()) == 1
    assert main(_train(run_dir, "lion", "--steps", "6", "--allow-config-change")) == 0
    state = _load(latest_checkpoint(run_dir), OptimConfig(name="lion"))
    assert state.step == 6
    assert set(state.opt_state.keys()) == {"exp_avg"}
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]

    # The parameters carried over: step 5's loss is taken at step 4's parameters, so it equals the
    # step-5 loss of the same run continued with AdamW (the optimizer only acts after it).
    control = tmp_path / "control"
    assert main(_train(control, "adamw", "--steps", "4", "--checkpoint.interval", "2")) == 0
    assert main(_train(control, "adamw", "--steps", "6", "--allow-config-change")) == 0
    assert rows[4]["loss"] == read_metrics(control / "metrics.jsonl")[4]["loss"]
