"""The order of a source's instances: a fresh permutation per epoch, from (seed, source, epoch)."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=16)
def epoch_permutation(seed: int, epoch: int, n_instances: int, stream: int = 0) -> np.ndarray:
    """A permutation of ``range(n_instances)``, the same on every machine for the same arguments.
    `stream` separates the orders of different sources of one run."""
    rng = np.random.Generator(np.random.PCG64([seed, stream, epoch]))
    perm = rng.permutation(n_instances)
    perm.flags.writeable = False
    return perm


def instances_of_draws(draws: np.ndarray, *, seed: int, n_instances: int, stream: int = 0) -> np.ndarray:
    """Instance index of each draw number: draw k is ``epoch_permutation(epoch = k // n)[k % n]``, so
    every instance is used once per epoch before any is repeated."""
    draws = np.asarray(draws, dtype=np.int64)
    epochs, offsets = np.divmod(draws, n_instances)
    out = np.empty_like(draws)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = epoch_permutation(seed, int(epoch), n_instances, stream)[offsets[chosen]]
    return out


def instance_indices(cursor: int, count: int, *, seed: int, n_instances: int, stream: int = 0) -> np.ndarray:
    """Instances number ``cursor .. cursor + count - 1`` of the endless sequence of shuffled epochs.

    The cursor (instances consumed so far) is all a resumed run needs to continue the same order.
    """
    return instances_of_draws(
        np.arange(cursor, cursor + count), seed=seed, n_instances=n_instances, stream=stream
    )
