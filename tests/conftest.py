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
