"""RMSNorm."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x², -1) + eps)`` over the last dimension.

    x: (..., d) in any float dtype; weight: (d,). Statistics and the scale are computed in fp32 (or
    fp64 for fp64 inputs); the result has x's dtype.
    """
    wide = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(wide)
    normed = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(wide) * normed).to(x.dtype)
