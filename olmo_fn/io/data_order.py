"""The order instances are trained in: a fresh permutation per epoch, derived from (seed, epoch)."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, n_instances: int) -> np.ndarray:
    """A permutation of ``range(n_instances)``, the same on every machine for the same arguments."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    perm = rng.permutation(n_instances)
    perm.flags.writeable = False
    return perm


def instance_indices(cursor: int, count: int, *, seed: int, n_instances: int) -> np.ndarray:
    """Instances number ``cursor .. cursor + count - 1`` of the endless sequence of shuffled epochs.

    The cursor (instances consumed so far) is all a resumed run needs to continue the same order.
    """
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        epoch, offset = divmod(cursor + filled, n_instances)
        take = min(count - filled, n_instances - offset)
        out[filled : filled + take] = epoch_permutation(seed, epoch, n_instances)[offset : offset + take]
        filled += take
    return out
