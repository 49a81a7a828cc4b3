"""`OptimConfig`: which optimizer updates the parameters, and its hyper-parameters."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from olmo_fn.errors import ConfigError

OptimizerName = Literal["adamw", "lion", "muon"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its hyper-parameters. Every optimizer is a functional in-place update over
    the parameter tree's leaves (`olmo_fn.state.optim.optimizer_update`)."""

    name: OptimizerName = "adamw"
    """``adamw``; ``lion`` (sign of interpolated momentum: one moment, use a 3-10x smaller lr); ``muon``
    (Newton-Schulz orthogonalised momentum for the blocks' 2-D matrices, AdamW with these settings for
    the embeddings, norms and LM head)."""
    lr: float = 4e-3
    """Peak learning rate (the schedule scales it). Muon's matrices take it adjusted by their shape
    (`muon_adjust_lr`)."""
    beta1: float = 0.9
    """AdamW: decay rate of the first moment. Lion: interpolation weight of the momentum in the update."""
    beta2: float = 0.95
    """AdamW (and Muon's AdamW leaves): decay rate of the second moment."""
    eps: float = 1e-8
    """AdamW: added to the root of the second moment in the denominator."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied as ``param *= 1 - lr * weight_decay``."""
    no_decay: tuple[str, ...] = ("embeddings", "*norm")
    """Glob patterns over dotted parameter paths that get no weight decay."""
    implementation: Literal["foreach", "fused"] = "foreach"
    """AdamW kernels: ``foreach`` (multi-tensor) or ``fused`` (one fused AdamW kernel per group)."""
    lion_beta2: float = 0.99
    """Lion: decay rate of its momentum."""
    muon_momentum: float = 0.95
    """Muon: decay rate of the matrices' momentum."""
    muon_nesterov: bool = True
    """Muon: orthogonalise the Nesterov look-ahead of the momentum rather than the momentum."""
    muon_ns_steps: int = 5
    """Muon: Newton-Schulz iterations per update."""
    muon_ns_dtype: Literal["bfloat16", "float32", "float64"] = "bfloat16"
    """Muon: the dtype of the Newton-Schulz iteration."""
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "match_rms_adamw"
    """Muon: ``match_rms_adamw`` scales each matrix's lr by ``0.2 * sqrt(max(rows, cols))`` so the
    update's RMS matches AdamW's (lr and weight decay carry over); ``original``: by
    ``sqrt(max(1, rows / cols))``."""

    def __post_init__(self) -> None:
        problems = []
        if self.name not in ("adamw", "lion", "muon"):
            problems.append(f"optim.name={self.name!r} must be adamw, lion or muon")
        if not 0 <= self.lr < math.inf:
            problems.append(f"optim.lr={self.lr!r} must be finite and >= 0")
        for name in ("beta1", "beta2", "lion_beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"optim.{name}={getattr(self, name)!r} must be in [0, 1)")
        if not 0 < self.eps < math.inf:
            problems.append(f"optim.eps={self.eps!r} must be finite and > 0")
        if not 0 <= self.weight_decay < math.inf:
            problems.append(f"optim.weight_decay={self.weight_decay!r} must be finite and >= 0")
        if self.muon_ns_steps < 1:
            problems.append(f"optim.muon_ns_steps={self.muon_ns_steps} must be >= 1")
        if problems:
            raise ConfigError("invalid optimizer config: " + "; ".join(problems))
