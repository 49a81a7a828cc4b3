"""Mixing sources: shares, schedules, repetition limits, data-parallel sharding, resumable order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from olmo_fn.errors import DataError
from olmo_fn.io.loader import DataConfig, Prefetcher, open_training_data
from olmo_fn.io.mixture import MIX_BLOCK, MixturePlan, SourceConfig, largest_remainder
from olmo_fn.io.token_file import write_token_file

SEQ = 4
VOCAB = 2**16


def numbered_file(path, n_instances: int, first: int):
    """A token file whose k-th instance starts with token first + k (so rows name their instance)."""
    tokens = np.full((n_instances, SEQ), 1, np.uint16)
    tokens[:, 0] = first + np.arange(n_instances)
    return write_token_file(path, tokens.reshape(-1))


def source(name, n, ratio=1.0, **kwargs):
    return SourceConfig(name, (f"{name}.npy",), ratio, **kwargs), n


@given(
    shares=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6).filter(lambda xs: sum(xs) > 0),
    total=st.integers(1, 5000),
)
@settings(max_examples=100, deadline=None)
def test_largest_remainder_sums_exactly_and_stays_within_one(shares, total):
    shares = np.array([shares]) / sum(shares)
    quotas = largest_remainder(shares, total)
    assert quotas.sum() == total
    assert np.all(np.abs(quotas - shares * total) < 1)


def test_shares_are_within_one_percent_of_the_ratios():
    sources = tuple(
        SourceConfig(n, (n,), r, max_repetition=math.inf) for n, r in [("a", 5), ("b", 3), ("c", 2)]
    )
    plan = MixturePlan((1000, 700, 300), sources, total_instances=40 * 256, seed=1)
    labels, _ = plan.draws(0, 40 * 256)
    for i, ratio in enumerate((0.5, 0.3, 0.2)):
        assert abs(np.mean(labels == i) - ratio) < 0.01
    for batch in range(0, 40 * 256, 2048):  # and in every run of a few batches
        window = labels[batch : batch + 2048]
        assert abs(np.mean(window == 0) - 0.5) < 0.01


def test_ratio_schedule_moves_the_shares():
    anneal = SourceConfig(
        "hq", ("x",), ratio_schedule=((0.0, 0.1), (0.5, 0.1), (1.0, 0.9)), max_repetition=math.inf
    )
    web = SourceConfig("web", ("y",), ratio_schedule=((0.0, 0.9), (1.0, 0.1)), max_repetition=math.inf)
    total = 100 * MIX_BLOCK
    plan = MixturePlan((10_000, 10_000), (anneal, web), total, seed=0)
    start, _ = plan.draws(0, MIX_BLOCK)
    end, _ = plan.draws(total - MIX_BLOCK, MIX_BLOCK)
    assert abs(np.mean(start == 0) - 0.1) < 0.01
    # At 99% of training: hq 0.1 + 0.8 * 0.98 = 0.884, web 0.9 - 0.8 * 0.99 = 0.108 -> share 0.891.
    assert abs(np.mean(end == 0) - 0.884 / (0.884 + 0.108)) < 0.01


def test_draws_of_each_source_run_through_whole_epochs():
    sources = (SourceConfig("a", ("a",), 1, max_repetition=5), SourceConfig("b", ("b",), 3, max_repetition=5))
    plan = MixturePlan((37, 101), sources, total_instances=400, seed=3)
    src, inst = plan.instances(0, 400)
    for s, size in ((0, 37), (1, 101)):
        mine = inst[src == s]
        for epoch in range(len(mine) // size):
            assert sorted(mine[epoch * size : (epoch + 1) * size]) == list(range(size))


def test_too_much_repetition_is_an_error_naming_the_source():
    sources = (SourceConfig("code", ("c",), 0.5, max_repetition=2.0), SourceConfig("web", ("w",), 0.5))
    with pytest.raises(
        DataError, match=r"data source 'code': the run draws 1,000 instances from its 100 \(10.00 epochs\)"
    ):
        MixturePlan((100, 10_000), sources, total_instances=2000, seed=0)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("two_sources")
    a = numbered_file(tmp_path / "a.npy", 24, first=0)
    b = numbered_file(tmp_path / "b.npy", 40, first=1000)
    mix = (
        SourceConfig("a", (str(a),), 0.375, max_repetition=math.inf),
        SourceConfig("b", (str(b),), 0.625, max_repetition=math.inf),
    )
    return DataConfig(sources=mix, eos_token_id=2, seq_len=SEQ)


@given(world=st.integers(1, 8), per_rank=st.integers(1, 4), seed=st.integers(0, 2**16), data=st.data())
@settings(max_examples=60, deadline=None)
def test_every_instance_once_per_epoch_across_any_number_of_ranks(
    tmp_path_factory, world, per_rank, seed, data
):
    n = world * per_rank * data.draw(st.integers(1, 6))  # one epoch is a whole number of global batches
    path = numbered_file(tmp_path_factory.mktemp("epoch") / "a.npy", n, first=0)
    loaded = open_training_data(DataConfig(paths=(str(path),), eos_token_id=2, seq_len=SEQ), VOCAB, seed=seed)
    global_batch = world * per_rank
    for epoch in range(2):
        seen = [
            loaded.batch(cursor, global_batch, rank=rank, world=world).input_ids[:, 0]
            for cursor in range(epoch * n, (epoch + 1) * n, global_batch)
            for rank in range(world)
        ]
        assert sorted(torch.cat(seen).tolist()) == list(range(n))


@given(start=st.integers(0, 300), batch=st.integers(1, 12), seed=st.integers(0, 99))
@settings(max_examples=30, deadline=None)
def test_resuming_from_a_cursor_gives_the_uninterrupted_batches(two_sources, start, batch, seed):
    data = open_training_data(two_sources, VOCAB, seed=seed, total_instances=1000)
    uninterrupted = [data.batch(c, batch) for c in range(0, start + 5 * batch, batch)]
    resumed_start = (start // batch) * batch
    fresh = open_training_data(two_sources, VOCAB, seed=seed, total_instances=1000)  # a new process
    with Prefetcher(lambda c: fresh.batch(c, batch), resumed_start, batch) as prefetch:
        for k in range(resumed_start // batch, len(uninterrupted)):
            cursor, got = prefetch.next()
            assert cursor == k * batch
            assert torch.equal(got.input_ids, uninterrupted[k].input_ids)
            assert torch.equal(got.labels, uninterrupted[k].labels)


def test_mixed_batches_hold_the_right_rows(two_sources):
    data = open_training_data(two_sources, VOCAB, seed=5, total_instances=4096)
    rows = data.batch(100, 64).input_ids[:, 0]
    sources = data.source_of(100, 64)
    assert torch.equal(rows >= 1000, torch.from_numpy(sources == 1))
    counts = np.bincount(data.source_of(0, 4096), minlength=2)
    assert abs(counts[0] / 4096 - 0.375) < 0.01


def test_prefetcher_hands_producer_errors_to_the_consumer():
    def produce(cursor):
        if cursor >= 2:
            raise DataError(f"bad batch at {cursor}")
        return open_training_data(DataConfig(), 384, seed=0).batch(cursor, 1)

    with Prefetcher(produce, 0, 1) as prefetch:
        assert prefetch.next()[0] == 0
        assert prefetch.next()[0] == 1
        with pytest.raises(DataError, match="bad batch at 2"):
            prefetch.next()
