"""Rotary position embeddings (RoPE), "rotate half" convention as in OLMo 2 and Hugging Face, with
the context-extension scalings of Llama 3 and YaRN and linear position interpolation."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

RopeScalingKind = Literal["none", "linear", "llama3", "yarn"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are rescaled to reach beyond the context a model was trained on.

    none: plain RoPE. linear (position interpolation): every frequency divided by `factor`.
    llama3: wavelengths longer than ``original_max_len / low_freq_factor`` divided by `factor`, shorter
    than ``original_max_len / high_freq_factor`` kept, smoothly blended between.
    yarn: per-frequency blend of interpolation (divided by `factor`) and extrapolation (kept) over a
    linear ramp between the dimensions that turn `beta_fast` and `beta_slow` times within
    `original_max_len`, and cos/sin scaled by `attention_factor` (default ``0.1 ln(factor) + 1``).
    """

    kind: RopeScalingKind = "none"
    factor: float = 1.0
    """How much longer the target context is than the original."""
    original_max_len: int = 8192
    """The context length the model was trained with (llama3, yarn)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_len / low_freq_factor are fully interpolated."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_len / high_freq_factor are kept."""
    beta_fast: float = 32.0
    """yarn: rotations within original_max_len above which a frequency is kept (extrapolated)."""
    beta_slow: float = 1.0
    """yarn: rotations within original_max_len below which a frequency is fully interpolated."""
    attention_factor: float | None = None
    """yarn: scale of cos and sin (and so of attention logits, squared); None: 0.1 ln(factor) + 1."""
    truncate: bool = True
    """yarn: round the ramp's ends outward to whole dimensions (as the YaRN paper's code does)."""


def rope_scaling_problems(s: RopeScaling) -> list[str]:
    """Every reason `s` is not a valid scaling, each naming the field and value."""
    problems = []
    if s.kind not in ("none", "linear", "llama3", "yarn"):
        problems.append(f"model.rope_scaling.kind={s.kind!r} must be none, linear, llama3 or yarn")
    if s.kind != "none" and not 0 < s.factor < math.inf:
        problems.append(f"model.rope_scaling.factor={s.factor!r} must be finite and > 0")
    if s.kind in ("llama3", "yarn") and not (isinstance(s.original_max_len, int) and s.original_max_len > 0):
        problems.append(
            f"model.rope_scaling.original_max_len={s.original_max_len!r} must be a positive integer"
        )
    if s.kind == "llama3" and not 0 < s.low_freq_factor < s.high_freq_factor:
        problems.append(
            f"model.rope_scaling.low_freq_factor={s.low_freq_factor} must be > 0 and below "
            f"high_freq_factor={s.high_freq_factor}"
        )
    if s.kind == "yarn" and not 0 < s.beta_slow <= s.beta_fast:
        problems.append(
            f"model.rope_scaling.beta_slow={s.beta_slow} must be > 0 and at most beta_fast={s.beta_fast}"
        )
    if s.kind == "yarn" and s.attention_factor is not None and not 0 < s.attention_factor < math.inf:
        problems.append(f"model.rope_scaling.attention_factor={s.attention_factor!r} must be finite and > 0")
    return problems


def rope_frequencies(
    d_head: int, theta: float, scaling: RopeScaling = RopeScaling(), device=None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (d_head // 2,) fp32 and the factor that scales cos and sin.

    Frequency i is ``theta ** (-2i / d_head)`` before scaling (see `RopeScaling`)."""
    exponent = torch.arange(0, d_head, 2, device=device, dtype=torch.float32) / d_head
    inv_freq = 1.0 / (theta**exponent)
    factor = scaling.factor
    if scaling.kind == "linear":
        return inv_freq / factor, 1.0
    if scaling.kind == "llama3":
        wavelength = 2 * math.pi / inv_freq
        long_wave = scaling.original_max_len / scaling.low_freq_factor
        short_wave = scaling.original_max_len / scaling.high_freq_factor
        # 0 at the long end (fully divided by factor), 1 at the short end (kept)
        keep = (scaling.original_max_len / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - keep) * inv_freq / factor + keep * inv_freq
        scaled = torch.where(wavelength > long_wave, inv_freq / factor, inv_freq)
        middle = (wavelength >= short_wave) & (wavelength <= long_wave)
        return torch.where(middle, blended, scaled), 1.0
    if scaling.kind == "yarn":

        def dimension_turning(rotations: float) -> float:
            # the dimension whose frequency turns `rotations` times within original_max_len
            turns = scaling.original_max_len / (rotations * 2 * math.pi)
            return d_head * math.log(turns) / (2 * math.log(theta))

        low, high = dimension_turning(scaling.beta_fast), dimension_turning(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d_head - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d_head // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(
            0, 1
        )
        keep = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
        attention = scaling.attention_factor
        if attention is None:
            attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return inv_freq, attention
    return inv_freq, 1.0


def rope_tables(
    positions: torch.Tensor, d_head: int, theta: float, scaling: RopeScaling = RopeScaling()
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for integer `positions` (batch, seq) -> two fp32 (batch, seq, d_head // 2).

    Angles are computed in fp32 from the integer positions, so per-document positions (restarting at
    0 after each document) need nothing special; `scaling` rescales frequencies (and, for YaRN, the
    tables themselves).
    """
    inv_freq, attention_factor = rope_frequencies(d_head, theta, scaling, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    if attention_factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., i], x[..., i + d/2])`` by the table's angles.

    x: (batch, seq, heads, d_head) any float dtype; cos/sin: (batch, seq, d_head // 2) fp32.
    Computed in fp32 (fp64 for fp64 inputs), returned in x's dtype.
    """
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
