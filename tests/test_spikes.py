"""Skipping spiking steps: the decision against a naive mean/deviation, a planted spike skipped and
nothing else, the skipped step leaving parameters and optimizer state untouched, and a resume from a
checkpoint written after the skip continuing exactly as the uninterrupted run."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch
from test_train_step import CFG, EOS, settings, state64

from olmo_fn.errors import ConfigError
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.instances import make_batch
from olmo_fn.state.checkpoint import load_checkpoint, save_checkpoint
from olmo_fn.state.spikes import SpikeConfig, SpikeWindow, judge
from olmo_fn.state.train_state import empty_train_state
from olmo_fn.state.train_step import make_train_step

SPIKE = SpikeConfig(sigmas=3.0, window=6, min_steps=4)
STEPS = 12
PLANTED = 8  # the step (0-based) whose batch is random tokens, after 8 steps on one repeated batch


def test_judge_matches_a_naive_mean_and_deviation():
    history = (2.0, 2.5, 1.5, 2.2, 1.8)
    mean, std = statistics.fmean(history), statistics.pstdev(history)
    window = SpikeWindow(history, history, skipped=2)
    below, above = mean + 2.9 * std, mean + 3.1 * std
    assert judge(window, below, 1.0, SPIKE)[0] is False
    assert judge(window, above, 1.0, SPIKE) == (True, dataclasses.replace(window, skipped=3))
    assert judge(window, 1.0, above, SPIKE)[0] is True  # the gradient norm alone
    assert judge(window, float("nan"), 1.0, SPIKE)[0] is True
    # too short a history never skips; a kept step enters the window, the oldest leaves at its size
    assert judge(SpikeWindow(history[:3], history[:3]), 100.0, 1.0, SPIKE)[0] is False
    skip, after = judge(dataclasses.replace(window, losses=(*history, 2.0)), 2.1, 1.9, SPIKE)
    assert not skip and after.losses == (*history[1:], 2.0, 2.1) and after.grad_norms == (*history, 1.9)


def test_spike_config_names_bad_values():
    with pytest.raises(ConfigError, match=r"spike.min_steps=9 must be in \[2, spike.window=6\]"):
        SpikeConfig(sigmas=3, window=6, min_steps=9)


def _batches():
    gen = torch.Generator().manual_seed(0)
    steady = make_batch(torch.randint(0, CFG.vocab_size, (8, 24), generator=gen), EOS)
    planted = make_batch(torch.randint(0, CFG.vocab_size, (8, 24), generator=gen), EOS)
    return [planted if k == PLANTED else steady for k in range(STEPS)]


def _step_settings(spike: SpikeConfig = SPIKE):
    """lr 3e-3: the loss on the repeated batch falls smoothly (about 0.06 a step), the planted batch's
    is about 0.45 above the last."""
    base = settings(total_steps=STEPS, spike=spike, max_grad_norm=None)
    return dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr=3e-3))


def test_a_planted_spike_is_skipped_and_nothing_else():
    step_fn, state, batches = make_train_step(_step_settings()), state64(), _batches()
    skipped = []
    for k, batch in enumerate(batches):
        before = {
            p: t.detach().clone() for p, t in flatten({"p": state.params, "o": state.opt_state}).items()
        }
        state, metrics = step_fn(state, batch)
        skipped.append(metrics["skipped"])
        after = flatten({"p": state.params, "o": state.opt_state})
        unchanged = all(torch.equal(before[p], after[p]) for p in before)
        assert unchanged == bool(metrics["skipped"]), k
    assert skipped == [int(k == PLANTED) for k in range(STEPS)]
    assert state.spikes.skipped == 1 and state.step == STEPS


def test_without_skipping_the_planted_step_updates(tmp_path):
    """The control: the same run with skipping off applies every update (so the skip above was not
    an accident of the batch)."""
    step_fn, state = make_train_step(_step_settings(SpikeConfig())), state64()
    for batch in _batches()[: PLANTED + 1]:
        before = flatten(state.params)["embeddings"].detach().clone()
        state, metrics = step_fn(state, batch)
        assert "skipped" not in metrics
        assert not torch.equal(before, flatten(state.params)["embeddings"])


def test_resume_across_a_skipped_step_is_exact(tmp_path):
    step_fn, batches = make_train_step(_step_settings()), _batches()
    whole = state64()
    for batch in batches:
        whole, _ = step_fn(whole, batch)

    state = state64()
    for batch in batches[: PLANTED + 1]:  # through the skipped step, then a checkpoint
        state, _ = step_fn(state, batch)
    save_checkpoint(tmp_path / "ckpt", state)
    template = empty_train_state(CFG, device="cpu", dtype=torch.float64)
    resumed = load_checkpoint(tmp_path / "ckpt", dataclasses.replace(template, params=template.params))
    assert resumed.spikes == state.spikes and resumed.spikes.skipped == 1
    for batch in batches[PLANTED + 1 :]:
        resumed, _ = step_fn(resumed, batch)
    assert resumed.spikes == whole.spikes
    for path, value in flatten(whole.params).items():
        assert torch.equal(flatten(resumed.params)[path], value), path
