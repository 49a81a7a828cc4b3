"""Gated feed-forward layers: SwiGLU and GeGLU."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from olmo_fn.graph.linear import linear

GATES = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}
"""The gate activation of each `ModelConfig.mlp_activation`."""


def gated_mlp(p: Mapping[str, torch.Tensor], x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``w2 @ (act(w1 @ x) * (w3 @ x))``: w1 gate, w3 up, w2 down; act silu (SwiGLU) or gelu (GeGLU).

    x: (..., d_model) -> (..., d_model)."""
    return linear(GATES[activation](linear(x, p["w1"])) * linear(x, p["w3"]), p["w2"])
