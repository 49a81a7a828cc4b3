"""The training order: one fresh permutation per epoch, addressable by a cursor for exact resumes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from olmo_fn.io.data_order import epoch_permutation, instance_indices


def naive_order(cursor: int, count: int, *, seed: int, n_instances: int) -> np.ndarray:
    """Concatenate whole epochs until the range is covered, then slice."""
    n_epochs = (cursor + count) // n_instances + 1
    stream = np.concatenate([epoch_permutation(seed, e, n_instances) for e in range(n_epochs)])
    return stream[cursor : cursor + count]


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("seed", [0, 12345])
def test_each_epoch_is_a_permutation(n, seed):
    for epoch in range(4):
        perm = epoch_permutation(seed, epoch, n)
        assert sorted(perm.tolist()) == list(range(n))
        via_cursor = instance_indices(epoch * n, n, seed=seed, n_instances=n)
        assert sorted(via_cursor.tolist()) == list(range(n)), "every instance exactly once per epoch"


def test_epochs_are_shuffled_differently():
    perms = [tuple(epoch_permutation(3, e, 50).tolist()) for e in range(5)]
    assert len(set(perms)) == 5
    assert perms[0] != tuple(range(50)), "the order is shuffled, not file order"


@settings(max_examples=50, deadline=None)
@given(
    n_instances=st.integers(1, 40),
    cursor=st.integers(0, 150),
    count=st.integers(0, 150),
    seed=st.integers(0, 2**32 - 1),
)
def test_instance_indices_is_a_slice_of_the_epoch_stream(n_instances, cursor, count, seed):
    got = instance_indices(cursor, count, seed=seed, n_instances=n_instances)
    assert got.dtype == np.int64
    assert got.shape == (count,)
    np.testing.assert_array_equal(got, naive_order(cursor, count, seed=seed, n_instances=n_instances))


@pytest.mark.parametrize(
    ("cursor", "count"),
    [(0, 10), (7, 3), (8, 5), (9, 1), (10, 10), (5, 25), (29, 2), (0, 0)],
)
def test_straddling_epoch_boundaries(cursor, count):
    """n=10: epoch e covers cursors 10e .. 10e+9."""
    n = 10
    stream = np.concatenate([epoch_permutation(5, e, n) for e in range(4)])
    np.testing.assert_array_equal(
        instance_indices(cursor, count, seed=5, n_instances=n), stream[cursor : cursor + count]
    )


def test_same_seed_same_order_different_seed_different_order():
    a = instance_indices(0, 300, seed=7, n_instances=100)
    b = instance_indices(0, 300, seed=7, n_instances=100)
    c = instance_indices(0, 300, seed=8, n_instances=100)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_order_does_not_depend_on_cache_state():
    """The lru_cache holds two epochs; asking for many others in between changes nothing."""
    first = instance_indices(95, 10, seed=1, n_instances=50).copy()
    for e in range(6):
        instance_indices(e * 50, 50, seed=2, n_instances=50)
        instance_indices(e * 50, 50, seed=1, n_instances=51)
    np.testing.assert_array_equal(instance_indices(95, 10, seed=1, n_instances=50), first)


def test_result_is_a_fresh_array():
    """Writing into one result must not change the cached permutation behind later results."""
    out = instance_indices(0, 20, seed=0, n_instances=20)
    expected = out.copy()
    out[:] = -1
    np.testing.assert_array_equal(instance_indices(0, 20, seed=0, n_instances=20), expected)


@settings(max_examples=50, deadline=None)
@given(
    n_instances=st.integers(1, 30),
    batch=st.integers(1, 16),
    n_batches=st.integers(1, 12),
    seed=st.integers(0, 1000),
)
def test_resume_in_steps_equals_one_big_call(n_instances, batch, n_batches, seed):
    steps = [instance_indices(k * batch, batch, seed=seed, n_instances=n_instances) for k in range(n_batches)]
    whole = instance_indices(0, batch * n_batches, seed=seed, n_instances=n_instances)
    np.testing.assert_array_equal(np.concatenate(steps), whole)
