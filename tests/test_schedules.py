"""Warmup-stable-decay and inverse-square-root schedules against closed forms written out here."""

from __future__ import annotations

import math

import pytest

from olmo_fn.errors import ConfigError
from olmo_fn.state.schedule import ScheduleConfig, lr_at


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_holds_the_peak_then_decays_over_the_last_fraction(shape):
    # 100 updates, 10 of warmup, decay over 20% of the other 90: the last 18 updates (82..99)
    cfg = ScheduleConfig(
        warmup_steps=10, decay="wsd", wsd_decay_fraction=0.2, wsd_shape=shape, min_lr_ratio=0.1
    )
    lrs = [lr_at(k, peak=3.0, cfg=cfg, total_steps=100) for k in range(100)]
    assert lrs[:10] == pytest.approx([3.0 * (k + 1) / 10 for k in range(10)])
    assert lrs[10:82] == [3.0] * 72
    curve = {
        "linear": lambda p: 1 - p,
        "cosine": lambda p: (1 + math.cos(math.pi * p)) / 2,
        "1-sqrt": lambda p: 1 - math.sqrt(p),
    }[shape]
    expected = [0.3 + 2.7 * curve((k - 81) / 18) for k in range(82, 100)]
    assert lrs[82:] == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.3)  # the last update is at the final learning rate


def test_wsd_anneals_from_a_later_start_step():
    """An annealing resume: the schedule restarts at start_step, with no warmup, and decays over the
    last half of what is left."""
    cfg = ScheduleConfig(warmup_steps=0, decay="wsd", wsd_decay_fraction=0.5, start_step=40, min_lr_ratio=0.0)
    lrs = [lr_at(k, peak=1.0, cfg=cfg, total_steps=60) for k in range(40, 60)]
    assert lrs[:10] == [1.0] * 10
    assert lrs[10:] == pytest.approx([1 - j / 10 for j in range(1, 11)])


@pytest.mark.parametrize("warmup", [0, 1, 8])
def test_inverse_sqrt_matches_its_closed_form(warmup):
    cfg = ScheduleConfig(warmup_steps=warmup, decay="inverse_sqrt")
    for total in (20, 1000):  # independent of the run's length
        lrs = [lr_at(k, peak=0.5, cfg=cfg, total_steps=total) for k in range(20)]
        expected = [
            0.5 * (k + 1) / warmup if k < warmup else 0.5 / math.sqrt((k + 1) / max(1, warmup))
            for k in range(20)
        ]
        assert lrs == pytest.approx(expected)


def test_wsd_fraction_out_of_range_is_one_line():
    with pytest.raises(ConfigError, match=r"schedule.wsd_decay_fraction=0 must be in \(0, 1\]"):
        ScheduleConfig(decay="wsd", wsd_decay_fraction=0)
