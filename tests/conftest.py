"""Shared test setup: an isolated cache for the embedded corpus, and float64 helpers."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Build the embedded stdlib corpus into a per-session directory, never into the user's cache."""
    path = tmp_path_factory.mktemp("olmo_fn_cache")
    old = os.environ.get("OLMO_FN_CACHE")
    os.environ["OLMO_FN_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("OLMO_FN_CACHE", None)
    else:
        os.environ["OLMO_FN_CACHE"] = old


@pytest.fixture
def gen():
    """A fixed-seed CPU generator, so every random input in a test is reproducible."""
    return torch.Generator().manual_seed(1234)


# Hypothesis profiles: `ci` (the default: a few examples per property, as CI runs them) and `nightly`
# (HYPOTHESIS_PROFILE=nightly: many). Properties that set max_examples themselves keep their count.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=20, deadline=None)
settings.register_profile(
    "nightly", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
