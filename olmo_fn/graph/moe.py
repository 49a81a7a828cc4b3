"""The mixture-of-experts feed-forward (OLMoE) as pure functions: a router picks `top_k` experts per
token, each expert is a gated MLP, and a token's output is the weighted sum of its experts' outputs.

Parameters of one MoE feed-forward (``blocks.{i}.feed_forward``), experts stacked on dim 0::

    router          (n_experts, d_model)
    expert_bias     (n_experts,)                     [bias_rate > 0: added to the scores for the choice]
    experts.w1/w3   (n_experts, hidden, d_model)     gate / up, (out, in) per expert
    experts.w2      (n_experts, d_model, hidden)     down
    shared.w1/w2/w3 a dense gated MLP of width shared_hidden   [shared_hidden > 0]

Dropless (the default), every assignment is computed: assignments are sorted by expert and each
expert multiplies its contiguous rows — one grouped GEMM (``torch._grouped_mm``) or one matmul per
expert, equal results. With a capacity factor each expert takes at most C assignments (earliest tokens
first) into an (n_experts, C, d_model) buffer multiplied by a batched matmul; the rest are dropped.

Auxiliary terms come back as sums over the micro-batch's tokens (`MoeAux`), so that, like the
cross-entropy sums, they can be added over micro-batches and ranks and divided by the batch's count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from olmo_fn.graph.feed_forward import GATES, gated_mlp
from olmo_fn.graph.moe_config import MoeConfig

MoeAux = dict[str, torch.Tensor]
"""fp32 sums over one micro-batch's tokens: ``lb_sum`` (the load-balancing loss times the token
count), ``router_z_sum`` (sum of logsumexp(router logits)²), ``expert_tokens`` (n_experts,: the
assignments routed to each expert), ``dropped`` (assignments past an expert's capacity), ``tokens``."""


def route(router: torch.Tensor, x: torch.Tensor, moe: MoeConfig, bias: torch.Tensor | None = None):
    """Top-k routing of tokens x (T, d_model) by the router matrix (n_experts, d_model).

    Returns ``(weights, experts, logits)``: weights (T, top_k) in x's dtype (the chosen experts' scores,
    renormalised to sum 1 if ``normalize_top_k``), experts (T, top_k) int64, logits (T, n_experts) in
    x's dtype or fp32, whichever is wider.
    Scores are softmax over the experts (or a sigmoid each), in at least fp32; ties are broken as
    ``torch.topk`` breaks them. With an expert `bias` (n_experts,) the experts are chosen by
    ``scores + bias`` and weighted by their scores alone (no gradient reaches the bias).
    """
    logits = x @ router.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scores = torch.softmax(logits, dim=-1) if moe.score == "softmax" else torch.sigmoid(logits)
    if bias is None:
        top, experts = torch.topk(scores, moe.top_k, dim=-1)
    else:
        experts = torch.topk(scores + bias.detach().to(scores.dtype), moe.top_k, dim=-1).indices
        top = scores.gather(-1, experts)
    if moe.normalize_top_k:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(x.dtype), experts, logits


def balancing_sums(logits: torch.Tensor, experts: torch.Tensor, moe: MoeConfig) -> tuple[torch.Tensor, ...]:
    """``(lb_sum, router_z_sum, expert_tokens)`` of one micro-batch's routing.

    The load-balancing loss (Switch / OLMoE) is ``n_experts · Σ_e f_e · P_e`` with f_e the assignments
    to expert e per token and P_e the mean routing probability of e (softmax; sigmoid scores are
    normalised over the experts first); it is top_k when the load is uniform. Returned times the token
    count T, as ``lb_sum``.
    """
    n_tokens = logits.shape[0]
    probs = torch.softmax(logits, dim=-1) if moe.score == "softmax" else torch.sigmoid(logits)
    if moe.score == "sigmoid":
        probs = probs / probs.sum(dim=-1, keepdim=True)
    counts = expert_counts(experts.reshape(-1), moe.n_experts).to(logits.dtype)
    lb = moe.n_experts * (counts / n_tokens * probs.mean(dim=0)).sum()
    z_sum = torch.logsumexp(logits, dim=-1).square().sum()
    return lb * n_tokens, z_sum, counts.to(torch.float32)


def expert_counts(flat_experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert, (n_experts,) int64: a bincount whose size does not depend on the data
    (so the compiler sees static shapes)."""
    return torch.zeros(n_experts, dtype=torch.int64, device=flat_experts.device).scatter_add_(
        0, flat_experts, torch.ones_like(flat_experts)
    )


def grouped_available(x: torch.Tensor, moe: MoeConfig, d_model: int) -> bool:
    """Whether ``torch._grouped_mm`` takes these experts: a 16-bit or fp32 dtype and rows whose
    widths are multiples of 16 bytes; on CUDA, bfloat16 on compute capability 9.0 and newer; under
    torch.compile, bfloat16 only (torch 2.13's compiled grouped GEMM)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # its compiled form takes bf16 only
        return False
    if (d_model * x.element_size()) % 16 or (moe.hidden * x.element_size()) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu"


def experts_path(moe: MoeConfig, x: torch.Tensor, d_model: int) -> str:
    """How `moe_feed_forward` computes the experts for inputs like x: ``capacity``, ``grouped`` or
    ``loop``."""
    if moe.capacity_factor:
        return "capacity"
    if moe.implementation == "auto":
        return "grouped" if grouped_available(x, moe, d_model) else "loop"
    return moe.implementation


def expert_rows_grouped(p: Mapping[str, Any], xs: torch.Tensor, counts: torch.Tensor, act) -> torch.Tensor:
    """Each expert's gated MLP on its rows of xs (N, d_model), sorted by expert with ``counts[e]`` rows
    for expert e: three grouped GEMMs."""
    offs = torch.cumsum(counts, 0).to(torch.int32)

    def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # w (E, out, in): rows @ w[e].T
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)

    return mm(act(mm(xs, p["w1"])) * mm(xs, p["w3"]), p["w2"])


def expert_rows_loop(p: Mapping[str, Any], xs: torch.Tensor, counts: torch.Tensor, act) -> torch.Tensor:
    """As `expert_rows_grouped`, one matmul per expert that has rows (reads the counts on the host, so
    it does not compile into one graph)."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            rows = xs[start : start + n]
            outs.append((act(rows @ p["w1"][e].T) * (rows @ p["w3"][e].T)) @ p["w2"][e].T)
            start += n
    return torch.cat(outs) if outs else xs.new_zeros((0, p["w2"].shape[1]))


def dropless_experts(p, x, weights, experts, moe: MoeConfig, act, grouped: bool) -> torch.Tensor:
    """Σ_j weights[t, j] · expert_{experts[t, j]}(x[t]) for every token, every assignment computed."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // moe.top_k
    counts = expert_counts(flat, moe.n_experts)
    rows = (expert_rows_grouped if grouped else expert_rows_loop)(p, x[token], counts, act)
    rows = rows * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add(0, token, rows)


def capacity_experts(p, x, weights, experts, moe: MoeConfig, act, capacity: int):
    """As `dropless_experts`, but expert e computes only its first `capacity` assignments (in token
    order) in an (n_experts, capacity, d_model) buffer; returns (output, dropped assignment count)."""
    n_experts, flat = moe.n_experts, experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    counts = expert_counts(flat, n_experts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(flat.numel(), device=x.device) - starts[sorted_experts]
    kept = slot < capacity
    # Dropped assignments write to (and read from) one spare slot past the end, then are cut off.
    index = torch.where(kept, sorted_experts * capacity + slot, n_experts * capacity)
    token = order // moe.top_k
    buffer = x.new_zeros((n_experts * capacity + 1, x.shape[-1])).index_copy(0, index, x[token])
    xs = buffer[:-1].view(n_experts, capacity, -1)
    hidden = act(xs @ p["w1"].transpose(-2, -1)) * (xs @ p["w3"].transpose(-2, -1))
    ys = (hidden @ p["w2"].transpose(-2, -1)).reshape(-1, x.shape[-1])
    ys = torch.cat([ys, x.new_zeros(1, x.shape[-1])])
    rows = ys[index] * (weights.reshape(-1)[order] * kept)[:, None]
    return torch.zeros_like(x).index_add(0, token, rows), (~kept).sum()


def moe_feed_forward(
    p: Mapping[str, Any],
    x: torch.Tensor,
    moe: MoeConfig,
    activation: str = "silu",
    *,
    dropless: Callable[..., torch.Tensor] = dropless_experts,
) -> tuple[torch.Tensor, MoeAux]:
    """The MoE feed-forward of x (..., d_model) -> (same shape, `MoeAux`).

    dropless: computes the routed experts without a capacity, with `dropless_experts`' arguments
    (expert parallelism passes one that sends the rows to the ranks holding their experts)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    weights, experts, logits = route(p["router"], flat, moe, p.get("expert_bias"))
    act = GATES[activation]
    capacity = moe.capacity(flat.shape[0])
    if capacity is None:
        grouped = experts_path(moe, flat, shape[-1]) == "grouped"
        out = dropless(p["experts"], flat, weights, experts, moe, act, grouped)
        dropped = torch.zeros((), device=x.device)
    else:
        out, dropped = capacity_experts(p["experts"], flat, weights, experts, moe, act, capacity)
    if moe.shared_hidden:
        out = out + gated_mlp(p["shared"], flat, activation)
    lb_sum, z_sum, counts = balancing_sums(logits, experts, moe)
    aux = {
        "lb_sum": lb_sum,
        "router_z_sum": z_sum,
        "expert_tokens": counts,
        "dropped": dropped.to(torch.float32),
        "tokens": torch.tensor(float(flat.shape[0]), device=x.device),
    }
    return out.reshape(shape), aux
