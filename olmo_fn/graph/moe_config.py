"""`MoeConfig`: the sparse feed-forward of a mixture-of-experts decoder (OLMoE), part of `ModelConfig`."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

ExpertsImplementation = Literal["auto", "grouped", "loop"]


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Which layers route their tokens to experts, and how. ``n_experts=0`` (the default): every layer
    has the dense gated MLP."""

    n_experts: int = 0
    """Experts per MoE layer (0: a dense model)."""
    top_k: int = 2
    """Experts each token is sent to."""
    hidden: int = 256
    """Hidden width of each expert's gated MLP."""
    every: int = 1
    """Layer i has an MoE feed-forward when (i + 1) % every == 0 (1: every layer; 2: every other,
    starting with the second); the other layers keep the dense MLP of width model.mlp_hidden."""
    score: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over the experts (OLMoE), or an independent sigmoid per expert."""
    normalize_top_k: bool = False
    """Rescale the chosen experts' scores to sum to 1 (OLMoE-0924: no)."""
    shared_hidden: int = 0
    """Hidden width of a shared expert every token also passes through (0: none)."""
    capacity_factor: float = 0.0
    """0: dropless. Otherwise each expert takes at most ceil(capacity_factor · tokens · top_k /
    n_experts) of a micro-batch's tokens, earliest tokens first; the rest of its tokens are dropped
    (that expert adds nothing for them)."""
    bias_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): with a rate > 0 each MoE layer has an
    ``expert_bias`` (n_experts,) added to the scores when choosing the top_k experts (not to their
    weights), and after every update the step moves it by ``bias_rate · sign(mean load − load_e)``
    from that step's expert loads (summed over micro-batches and ranks). 0: no bias."""
    lb_loss: float = 0.01
    """Weight of the load-balancing loss (Switch/OLMoE form) in the objective."""
    router_z_loss: float = 0.001
    """Weight of the router z-loss, mean(logsumexp(router logits)²), in the objective."""
    implementation: ExpertsImplementation = "auto"
    """How the experts' matmuls run: grouped (torch._grouped_mm), loop (one matmul per expert), or
    auto (grouped where the device, dtype and widths allow it, else loop). Both give equal results."""

    @property
    def enabled(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.enabled and (layer + 1) % self.every == 0

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments one expert takes from `n_tokens` tokens; None when dropless."""
        if not self.capacity_factor:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)


def moe_config_problems(moe: MoeConfig) -> list[str]:
    """Every reason `moe` cannot build a model, each naming the field and value."""
    if not isinstance(moe, MoeConfig):
        return [f"model.moe={moe!r} must be a MoeConfig"]
    if not isinstance(moe.n_experts, int) or moe.n_experts < 0:
        return [f"model.moe.n_experts={moe.n_experts!r} must be an integer >= 0 (0: dense)"]
    if not moe.enabled:
        return []
    problems = []
    for name in ("top_k", "hidden", "every"):
        value = getattr(moe, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"model.moe.{name}={value!r} must be a positive integer")
    if not problems and moe.top_k > moe.n_experts:
        problems.append(f"model.moe.top_k={moe.top_k} exceeds model.moe.n_experts={moe.n_experts}")
    if not isinstance(moe.shared_hidden, int) or moe.shared_hidden < 0:
        problems.append(f"model.moe.shared_hidden={moe.shared_hidden!r} must be an integer >= 0 (0: none)")
    if not 0 <= moe.capacity_factor < math.inf:
        problems.append(f"model.moe.capacity_factor={moe.capacity_factor!r} must be >= 0 (0: dropless)")
    for name in ("lb_loss", "router_z_loss", "bias_rate"):
        value = getattr(moe, name)
        if not 0 <= value < math.inf:
            problems.append(f"model.moe.{name}={value!r} must be finite and >= 0")
    if moe.score not in ("softmax", "sigmoid"):
        problems.append(f"model.moe.score={moe.score!r} must be softmax or sigmoid")
    if moe.implementation not in ("auto", "grouped", "loop"):
        problems.append(f"model.moe.implementation={moe.implementation!r} must be auto, grouped or loop")
    return problems
