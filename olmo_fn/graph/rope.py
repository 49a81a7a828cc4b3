"""Rotary position embeddings (RoPE), "rotate half" convention as in OLMo 2 and Hugging Face."""

from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, d_head: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for integer `positions` (batch, seq) -> two fp32 (batch, seq, d_head // 2).

    Frequency i is ``theta ** (-2i / d_head)``; angles are computed in fp32 from the integer positions,
    so per-document positions (restarting at 0 after each document) need nothing special.
    """
    exponent = torch.arange(0, d_head, 2, device=positions.device, dtype=torch.float32) / d_head
    inv_freq = 1.0 / (theta**exponent)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., i], x[..., i + d/2])`` by the table's angles.

    x: (batch, seq, heads, d_head) any float dtype; cos/sin: (batch, seq, d_head // 2) fp32.
    Computed in fp32 (fp64 for fp64 inputs), returned in x's dtype.
    """
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
