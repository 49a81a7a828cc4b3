"""One persistent pool of gloo worker processes per world size, shared by the property modules."""

from __future__ import annotations

import pytest

from rank_pool import RankPool


@pytest.fixture(scope="session")
def pools():
    started: dict[int, RankPool] = {}

    def pool(world: int) -> RankPool:
        if world not in started:
            started[world] = RankPool(world)
        return started[world]

    yield pool
    for running in started.values():
        running.close()
