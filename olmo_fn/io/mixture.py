"""Mixing several data sources to target ratios, deterministically and resumably.

The endless sequence of training instances is cut into blocks of `MIX_BLOCK`. Each block holds
exactly the quota of every source that its ratios ask for (largest-remainder rounding), in an order
shuffled from ``(seed, block)``; ratios may change over training on a schedule. The k-th instance
drawn from source s follows `olmo_fn.io.data_order` (stream s), so every instance of a source is used
once before any is repeated. Everything is a function of the
global cursor (instances consumed so far): resuming needs nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from olmo_fn.errors import ConfigError, DataError
from olmo_fn.io.data_order import instances_of_draws

MIX_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One source of a data mixture."""

    name: str
    """A name for messages and metrics."""
    paths: tuple[str, ...]
    """Token files or glob patterns."""
    ratio: float = 1.0
    """Target share of training instances (ratios are normalised over the sources)."""
    ratio_schedule: tuple[tuple[float, float], ...] = ()
    """(fraction of training, ratio) points, linearly interpolated; replaces `ratio` when given."""
    max_repetition: float = 1.0
    """How many times each instance may be used over the run (epochs); more is an error."""

    def __post_init__(self) -> None:
        where = f"data.sources[{self.name!r}]"
        if not self.paths:
            raise ConfigError(f"{where}.paths is empty")
        if isinstance(self.paths, str) or not all(isinstance(p, str) for p in self.paths):
            raise ConfigError(f"{where}.paths={self.paths!r} must be a list of file names or patterns")
        points = self.ratio_schedule
        if not all(
            isinstance(p, tuple | list) and len(p) == 2 and all(_is_number(v) for v in p) for p in points
        ):
            raise ConfigError(
                f"{where}.ratio_schedule={_show(points)} must be a list of [fraction, ratio] pairs, "
                "e.g. [[0.0, 0.2], [1.0, 0.5]]"
            )
        if (
            not _is_number(self.ratio)
            or not 0 <= self.ratio < math.inf
            or any(not 0 <= r < math.inf for _, r in points)
        ):
            raise ConfigError(f"{where}: ratios must be finite and >= 0")
        fractions = [f for f, _ in points]
        if fractions != sorted(fractions) or any(not 0 <= f <= 1 for f in fractions):
            raise ConfigError(f"{where}.ratio_schedule fractions must rise within [0, 1], got {fractions}")
        if not _is_number(self.max_repetition) or not self.max_repetition > 0:
            raise ConfigError(f"{where}.max_repetition={self.max_repetition} must be > 0")

    def ratio_at(self, progress: np.ndarray) -> np.ndarray:
        """Unnormalised ratio at training `progress` (fractions in [0, 1])."""
        if not self.ratio_schedule:
            return np.full_like(progress, self.ratio, dtype=np.float64)
        fractions, ratios = zip(*self.ratio_schedule, strict=True)
        return np.interp(progress, fractions, ratios)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _show(value: object) -> str:
    return repr(value).replace("(", "[").replace(")", "]").replace(",]", "]")


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas (rows of `shares` scaled to `total`) that sum to `total` exactly; ties go to the
    lower source index. shares: (blocks, sources), rows summing to 1."""
    exact = shares * total
    quotas = np.floor(exact).astype(np.int64)
    missing = total - quotas.sum(axis=1)
    remainder = exact - quotas
    order = np.argsort(-remainder, axis=1, kind="stable")
    ranks = np.argsort(order, axis=1, kind="stable")
    return quotas + (ranks < missing[:, None])


class MixturePlan:
    """Which source, and which of its instances, each global draw takes.

    sizes: instances in each source; total_instances: instances in the whole run (ratio schedules
    are fractions of it). Built once per run; raises DataError when a source would be repeated
    more than its max_repetition allows.
    """

    def __init__(
        self, sizes: tuple[int, ...], sources: tuple[SourceConfig, ...], total_instances: int, seed: int
    ):
        self.sizes, self.sources, self.total_instances, self.seed = sizes, sources, total_instances, seed
        n_blocks = math.ceil(total_instances / MIX_BLOCK) + 1
        progress = np.minimum(np.arange(n_blocks) * MIX_BLOCK / max(1, total_instances), 1.0)
        ratios = np.stack([s.ratio_at(progress) for s in sources], axis=1)
        totals = ratios.sum(axis=1, keepdims=True)
        if np.any(totals <= 0):
            raise ConfigError("data.sources: the ratios are all zero at some point of the schedule")
        self._quotas = largest_remainder(ratios / totals, MIX_BLOCK)
        self._before = np.concatenate([np.zeros((1, len(sources)), np.int64), self._quotas.cumsum(0)])
        self._check_repetition()

    def _quotas_of(self, block: int) -> np.ndarray:
        return self._quotas[min(block, len(self._quotas) - 1)]

    def _draws_before_block(self, block: int) -> np.ndarray:
        last = len(self._quotas) - 1
        if block <= last:
            return self._before[block]
        return self._before[last] + (block - last) * self._quotas[last]

    @functools.lru_cache(maxsize=8)  # noqa: B019 (a plan lives for a whole run)
    def block_labels(self, block: int) -> np.ndarray:
        """The source of each position in `block`, shuffled from (seed, block)."""
        labels = np.repeat(np.arange(len(self.sources)), self._quotas_of(block))
        return np.random.Generator(np.random.PCG64([self.seed, 0xB10C, block])).permutation(labels)

    def draws(self, cursor: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, per-source draw number) of global instances ``cursor .. cursor + count - 1``."""
        if len(self.sources) == 1:
            return np.zeros(count, np.int64), np.arange(cursor, cursor + count, dtype=np.int64)
        sources = np.empty(count, np.int64)
        numbers = np.empty(count, np.int64)
        filled = 0
        while filled < count:
            block, offset = divmod(cursor + filled, MIX_BLOCK)
            take = min(count - filled, MIX_BLOCK - offset)
            labels = self.block_labels(block)
            one_hot = labels[:, None] == np.arange(len(self.sources))
            earlier = np.cumsum(one_hot, axis=0) - one_hot  # draws of each source earlier in the block
            rows = np.arange(offset, offset + take)
            counts = self._draws_before_block(block) + earlier[rows]
            sources[filled : filled + take] = labels[rows]
            numbers[filled : filled + take] = counts[np.arange(take), labels[rows]]
            filled += take
        return sources, numbers

    def instances(self, cursor: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, instance index within that source) of global instances ``cursor ..``."""
        sources, numbers = self.draws(cursor, count)
        instances = np.empty_like(numbers)
        for s in np.unique(sources):
            chosen = sources == s
            instances[chosen] = instances_of_draws(
                numbers[chosen], seed=self.seed, n_instances=self.sizes[s], stream=int(s)
            )
        return sources, instances

    def draws_over_run(self) -> np.ndarray:
        """How many instances each source gives over the whole run."""
        block, offset = divmod(self.total_instances, MIX_BLOCK)
        partial = np.bincount(self.block_labels(block)[:offset], minlength=len(self.sources))
        return self._draws_before_block(block) + partial

    def _check_repetition(self) -> None:
        for source, size, draws in zip(self.sources, self.sizes, self.draws_over_run(), strict=True):
            if draws > source.max_repetition * size:
                raise DataError(
                    f"data source {source.name!r}: the run draws {draws:,} instances from its {size:,} "
                    f"({draws / size:.2f} epochs) but max_repetition is {source.max_repetition}; "
                    "add data, lower its ratio, shorten the run, or raise max_repetition"
                )
