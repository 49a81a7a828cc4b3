"""SwiGLU feed-forward layer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def swiglu(p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``w2 @ (silu(w1 @ x) * (w3 @ x))``: w1 gate, w3 up, w2 down. x: (..., d_model) -> (..., d_model)."""
    return (F.silu(x @ p["w1"].T) * (x @ p["w3"].T)) @ p["w2"].T
