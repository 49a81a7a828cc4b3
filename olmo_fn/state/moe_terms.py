"""The mixture-of-experts terms of a train step: the auxiliary losses the objective adds, the statistics
summed over micro-batches and ranks, the metrics made from them, and what MoE cannot run with yet.

The objective of a batch is ``(ce_sum + z_loss · z_sum + lb_loss · Σ lb_sum + router_z_loss ·
Σ router_z_sum) / n_targets``: each auxiliary term is a sum over a micro-batch's tokens (see
`olmo_fn.graph.moe`), so, like the cross-entropy, the gradient of the whole batch does not depend on
how it is split into micro-batches, except through the balancing loss itself, which is computed per
micro-batch on each rank (as OLMoE and OLMo-core do): one process equals a plan whose ranks hold the
same rows as its micro-batches.
"""

from __future__ import annotations

from typing import Any

import torch

from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.moe import MoeAux
from olmo_fn.graph.param_tree import flatten, unflatten

STAT_KEYS = ("lb_sum", "router_z_sum", "expert_tokens", "dropped", "tokens")


def moe_objective_sum(aux: dict[int, MoeAux], model: ModelConfig) -> torch.Tensor | float:
    """The weighted auxiliary sums of one micro-batch's MoE layers (0 for a dense model)."""
    total: torch.Tensor | float = 0.0
    for layer in aux.values():
        total = total + model.moe.lb_loss * layer["lb_sum"] + model.moe.router_z_loss * layer["router_z_sum"]
    return total


def add_stats(total: dict[str, torch.Tensor], aux: dict[int, MoeAux]) -> dict[str, torch.Tensor]:
    """`total` plus one micro-batch's statistics, detached, keyed ``"{layer}/{name}"``."""
    out = dict(total)
    for layer, values in aux.items():
        for name in STAT_KEYS:
            key = f"{layer}/{name}"
            value = values[name].detach().float()
            out[key] = out[key] + value if key in out else value
    return out


def moe_metrics(stats: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Metrics from a step's statistics (summed over micro-batches and ranks): over all MoE layers
    ``moe/lb_loss`` and ``moe/router_z_loss`` (unweighted, per token, mean over layers),
    ``moe/load_max`` / ``moe/load_min`` (the busiest / idlest expert's assignments over the uniform
    share, over all layers), ``moe/dropped`` (fraction of assignments dropped); per layer
    ``moe/layer{i}/load_max`` and ``load_min``, and ``moe/layer{i}/tokens`` (n_experts,): the
    assignments each expert got (a list in metrics.jsonl; the scalar loggers skip it)."""
    layers = sorted({int(key.split("/")[0]) for key in stats})
    if not layers:
        return {}
    metrics: dict[str, Any] = {}
    lb, rz, ratios_max, ratios_min, dropped, assigned = [], [], [], [], 0.0, 0.0
    for layer in layers:
        s = {name: stats[f"{layer}/{name}"] for name in STAT_KEYS}
        tokens = s["tokens"].clamp(min=1)
        lb.append(s["lb_sum"] / tokens)
        rz.append(s["router_z_sum"] / tokens)
        load = s["expert_tokens"] / (s["expert_tokens"].sum().clamp(min=1) / model.moe.n_experts)
        metrics[f"moe/layer{layer}/tokens"] = s["expert_tokens"]
        metrics[f"moe/layer{layer}/load_max"] = load.max()
        metrics[f"moe/layer{layer}/load_min"] = load.min()
        ratios_max.append(load.max())
        ratios_min.append(load.min())
        dropped = dropped + s["dropped"]
        assigned = assigned + s["expert_tokens"].sum()
    metrics["moe/lb_loss"] = torch.stack(lb).mean()
    metrics["moe/router_z_loss"] = torch.stack(rz).mean()
    metrics["moe/load_max"] = torch.stack(ratios_max).max()
    metrics["moe/load_min"] = torch.stack(ratios_min).min()
    metrics["moe/dropped"] = dropped / torch.as_tensor(assigned).clamp(min=1)
    return metrics


def is_expert_bias(path: str) -> bool:
    """Whether the leaf at dotted `path` is an expert bias: moved by `update_expert_biases`, never by
    the optimizer (no gradient reaches it)."""
    return path.endswith(".expert_bias")


def without_expert_biases(tree: Any, model: ModelConfig) -> Any:
    """`tree` (the same tensors, updated in place through it) without its expert biases: the
    parameters and optimizer state the optimizer updates."""
    if not model.moe.bias_rate:
        return tree
    return unflatten({path: t for path, t in flatten(tree).items() if not is_expert_bias(path)})


@torch.no_grad()
def update_expert_biases(params: Any, stats: dict[str, torch.Tensor], model: ModelConfig) -> None:
    """In place, after an update: each MoE layer's ``expert_bias += bias_rate · sign(mean load −
    load)``, the loads being the step's expert assignments summed over micro-batches and ranks (the
    same on every rank). Placed biases (DTensors) take the local part of the same step."""
    if not model.moe.bias_rate:
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    for path, bias in flatten(params).items():
        if not is_expert_bias(path):
            continue
        load = stats[f"{path.split('.')[1]}/expert_tokens"]
        step = model.moe.bias_rate * torch.sign(load.mean() - load).to(bias.dtype)
        if isinstance(bias, DTensor):
            step = distribute_tensor(step, bias.device_mesh, bias.placements, src_data_rank=None)
        bias.add_(step)


def moe_run_problems(model: ModelConfig, parallel: Any, *, compile_step: bool, fp8: str) -> list[str]:
    """Why a run of this MoE model cannot go as configured (empty for a dense model, or when it can)."""
    if not model.moe.enabled:
        return []
    problems = []
    for axis in ("tp", "cp", "pp"):
        if getattr(parallel, axis) > 1:
            problems.append(
                f"parallel.{axis}={getattr(parallel, axis)} with an MoE model is not supported yet "
                "(use data parallel, FSDP or expert parallel)"
            )
    if compile_step:
        problems.append("compile=step with an MoE model is not supported yet (use compile=on)")
    if fp8 != "none":
        problems.append(f"fp8={fp8} with an MoE model is not supported yet (experts are not float8 matmuls)")
    return problems


def moe_compile_problem(model: ModelConfig, compute_dtype: torch.dtype) -> str | None:
    """Why a compiled block cannot hold this MoE model's experts, or None: dropless experts compile
    as grouped GEMMs, which torch.compile takes in bfloat16 only (the per-expert loop reads counts on
    the host); the capacity path is a batched matmul and compiles in any dtype."""
    moe = model.moe
    if not moe.enabled or moe.capacity_factor:
        return None
    if moe.implementation == "loop":
        return (
            "compile=on with model.moe.implementation=loop: the per-expert loop does not compile; use grouped"
        )
    if compute_dtype != torch.bfloat16:
        dtype = str(compute_dtype).removeprefix("torch.")
        return (
            f"compile=on with dropless MoE experts needs dtype bfloat16 (grouped GEMMs), not {dtype}; "
            "use --compile off, --dtype bfloat16, or --model.moe.capacity-factor"
        )
    return None
