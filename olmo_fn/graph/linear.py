"""The one matmul of the block's weight matrices: ``x @ w.T``, or a weight's own recipe."""

from __future__ import annotations

from typing import Any

import torch


def linear(x: torch.Tensor, w: Any) -> torch.Tensor:
    """``x @ w.T`` for a matrix stored ``(out, in)``: x (..., in) -> (..., out).

    `w` may also be a weight that carries its own matmul (an object with ``linear(x)``), such as the
    float8 weights of `olmo_fn.parallelize.fp8`; the block formulas stay the same either way.
    """
    if isinstance(w, torch.Tensor):
        return x @ w.T
    return w.linear(x)
