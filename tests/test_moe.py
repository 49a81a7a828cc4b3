"""The mixture-of-experts feed-forward (olmo_fn/graph/moe.py) against a naive per-token reference
written here: routing, expert outputs, capacity drops and the auxiliary sums, values and gradients.

The router computes in at least fp32 (`route`), so float64 runs match the float64 reference to
float64 rounding. Draws whose k-th and (k+1)-th routing probabilities nearly tie are skipped: there
the two may order equal scores differently.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from olmo_fn.graph.moe import balancing_sums, grouped_available, moe_feed_forward, route
from olmo_fn.graph.moe_config import MoeConfig

F64_TOL = {"atol": 1e-10, "rtol": 1e-9}
"""float64 inputs against the float64 reference (the router computes in float64 too)."""
STARVE = -40.0
"""Router weight on the always-positive feature 0 for an expert that must receive no tokens."""
HOT = 20.0
"""Router weight on feature 0 for an expert every token must pick (to overflow its capacity)."""


# --- the naive reference -----------------------------------------------------------------------------


def ref_act(name, z):
    if name == "silu":
        return z / (1 + torch.exp(-z))
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def ref_mlp(w1, w2, w3, x_t, activation):
    """``w2 @ (act(w1 @ x_t) * (w3 @ x_t))`` for one token."""
    return w2 @ (ref_act(activation, w1 @ x_t) * (w3 @ x_t))


def ref_probs(logits, score):
    if score == "softmax":
        e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        return e / e.sum(dim=-1, keepdim=True)
    return 1 / (1 + torch.exp(-logits))


def ref_route(router, xs, moe):
    """float64 logits, probabilities, and each token's top-k (weights, experts)."""
    logits = xs.double() @ router.double().T
    probs = ref_probs(logits, moe.score)
    top, experts = torch.topk(probs, moe.top_k, dim=-1)
    if moe.normalize_top_k:
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, probs, top, experts


def ref_moe(p, x, moe, activation, capacity=None):
    """Per token t, per top-k slot j in order: ``weight · expert_e(x_t)``, summed, plus the shared MLP.

    With `capacity`, expert e keeps only its first `capacity` assignments in (token, slot) order.
    Returns (output, per-expert assignment counts, dropped count, experts (T, top_k), probs)."""
    xs = x.reshape(-1, x.shape[-1])
    _, probs, top, experts = ref_route(p["router"], xs, moe)
    ex = p["experts"]
    used, dropped, outs = [0] * moe.n_experts, 0, []
    for t in range(xs.shape[0]):
        y = torch.zeros(x.shape[-1], dtype=torch.float64)
        for j in range(moe.top_k):
            e = int(experts[t, j])
            used[e] += 1
            if capacity is not None and used[e] > capacity:
                dropped += 1
                continue
            y = y + top[t, j] * ref_mlp(ex["w1"][e], ex["w2"][e], ex["w3"][e], xs[t], activation)
        if moe.shared_hidden:
            sh = p["shared"]
            y = y + ref_mlp(sh["w1"], sh["w2"], sh["w3"], xs[t], activation)
        outs.append(y)
    return torch.stack(outs).reshape(x.shape), used, dropped, experts, probs


def ref_lb_loss(probs, experts, n_experts, score):
    """Switch/OLMoE: ``n_experts · Σ_e (count_e / T) · mean_t prob_{t,e}``, counts over all top-k
    assignments; sigmoid probabilities normalised over the experts first."""
    if score == "sigmoid":
        probs = probs / probs.sum(dim=-1, keepdim=True)
    n_tokens = probs.shape[0]
    counts = [0] * n_experts
    for e in experts.reshape(-1).tolist():
        counts[e] += 1
    return n_experts * sum(counts[e] / n_tokens * probs[:, e].mean() for e in range(n_experts))


# --- inputs -----------------------------------------------------------------------------------------


def make_inputs(seed, moe, shape, d_model, dtype, starved=(), hot=None):
    """Random x (shape + (d_model,)) whose feature 0 is in [1, 2), and parameters; experts in `starved`
    get router weight STARVE on feature 0 (so no token picks them), expert `hot` gets HOT."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(size, generator=gen, dtype=torch.float64) * scale).to(dtype)

    n, h, d = moe.n_experts, moe.hidden, d_model
    x = randn(*shape, d)
    x[..., 0] = 1 + torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    router = randn(n, d, scale=1.5 / math.sqrt(d))
    for e in starved:
        router[e, 0] = STARVE
    if hot is not None:
        router[hot, 0] = HOT
    p = {
        "router": router,
        "experts": {
            "w1": randn(n, h, d, scale=d**-0.5),
            "w3": randn(n, h, d, scale=d**-0.5),
            "w2": randn(n, d, h, scale=h**-0.5),
        },
    }
    if moe.shared_hidden:
        s = moe.shared_hidden
        p["shared"] = {
            "w1": randn(s, d, scale=d**-0.5),
            "w3": randn(s, d, scale=d**-0.5),
            "w2": randn(d, s, scale=s**-0.5),
        }
    return x, p


def leaves(p):
    """The parameter tree as {dotted name: tensor}."""
    out = {"router": p["router"]}
    for group in ("experts", "shared"):
        for name, t in p.get(group, {}).items():
            out[f"{group}.{name}"] = t
    return out


def with_grad(x, p):
    """Leaf copies of x and p that require grad."""
    x = x.detach().clone().requires_grad_(True)
    p = {
        k: v.detach().clone().requires_grad_(True)
        if isinstance(v, torch.Tensor)
        else {n: t.detach().clone().requires_grad_(True) for n, t in v.items()}
        for k, v in p.items()
    }
    return x, p


def grads(out, x, p, cotangent):
    names = ["x", *leaves(p)]
    got = torch.autograd.grad((out * cotangent).sum(), [x, *leaves(p).values()])
    return dict(zip(names, got, strict=True))


def assert_grads_close(got, want, **tol):
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"d/d{n}: {m}", **tol)


def top_k_margin(probs, top_k):
    """The smallest relative gap between a token's k-th and (k+1)-th probability (inf when top_k =
    n_experts): below it, rounding may order the two differently in the code and the reference."""
    if top_k == probs.shape[-1]:
        return math.inf
    s = probs.sort(dim=-1, descending=True).values
    return ((s[:, top_k - 1] - s[:, top_k]) / s[:, top_k - 1]).min().item()


@st.composite
def routings(draw, widths=None):
    """A MoeConfig with its inputs' shape, d_model, activation, starved experts and a seed."""
    widths = st.integers(1, 6) if widths is None else widths
    n_experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, min(3, n_experts)))
    moe = MoeConfig(
        n_experts=n_experts,
        top_k=top_k,
        hidden=draw(widths),
        score=draw(st.sampled_from(["softmax", "sigmoid"])),
        normalize_top_k=draw(st.booleans()),
        shared_hidden=draw(st.one_of(st.just(0), widths)),
        implementation="loop",
    )
    shape = draw(st.sampled_from([(1,), (3,), (7,), (2, 5), (3, 4)]))
    n_starved = draw(st.integers(0, n_experts - top_k))
    starved = tuple(draw(st.permutations(range(n_experts)))[:n_starved])
    return {
        "moe": moe,
        "shape": shape,
        "d_model": draw(widths),
        "activation": draw(st.sampled_from(["silu", "gelu"])),
        "starved": starved,
        "seed": draw(st.integers(0, 2**16)),
    }


STARVED_CASE = {
    "moe": MoeConfig(n_experts=6, top_k=2, hidden=4, shared_hidden=4, implementation="loop"),
    "shape": (2, 5),
    "d_model": 4,
    "activation": "silu",
    "starved": (1, 4),
    "seed": 7,
}
"""An explicit case that always runs: two experts receive no tokens, with a shared expert."""


# --- 1. loop against the reference, float64 ---------------------------------------------------------


@given(case=routings())
@example(case=STARVED_CASE)
def test_loop_matches_naive_reference_float64(case):
    """implementation="loop" in float64 equals the per-token reference, output and gradients w.r.t. x,
    router, experts.* and shared.*, including experts that receive no tokens."""
    moe, starved = case["moe"], case["starved"]
    x, p = make_inputs(case["seed"], moe, case["shape"], case["d_model"], torch.float64, starved)
    x, p = with_grad(x, p)
    want, counts, _, _, probs = ref_moe(p, x, moe, case["activation"])
    assume(top_k_margin(probs.detach(), moe.top_k) > 1e-4)  # no near-ties for rounding to flip
    for e in starved:
        assert counts[e] == 0, "the starved expert should receive no tokens"
    got, aux = moe_feed_forward(p, x, moe, case["activation"])
    assert got.shape == x.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, **F64_TOL)
    assert aux["expert_tokens"].tolist() == counts
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got_grads = grads(got, x, p, cotangent)
    assert_grads_close(got_grads, grads(want, x, p, cotangent), **F64_TOL)
    for e in starved:  # an expert without tokens gets no gradient from its matmuls
        for name in ("w1", "w2", "w3"):
            assert got_grads[f"experts.{name}"][e].abs().max() == 0


def test_many_experts_few_tokens_leave_most_experts_empty():
    """With 8 experts, top-2 and 2 tokens, at least 4 experts get nothing; loop still equals the reference."""
    moe = MoeConfig(n_experts=8, top_k=2, hidden=3, score="sigmoid", implementation="loop")
    x, p = make_inputs(3, moe, (2,), 5, torch.float64)
    want, counts, _, _, _ = ref_moe(p, x, moe, "gelu")
    assert counts.count(0) >= 4
    got, aux = moe_feed_forward(p, x, moe, "gelu")
    torch.testing.assert_close(got, want, **F64_TOL)
    assert aux["expert_tokens"].tolist() == counts


def test_route_matches_reference_routing():
    """`route` picks the reference's experts (in score order) and weights, renormalised or not."""
    for score in ("softmax", "sigmoid"):
        for normalize in (False, True):
            moe = MoeConfig(n_experts=5, top_k=3, hidden=4, score=score, normalize_top_k=normalize)
            x, p = make_inputs(11, moe, (9,), 6, torch.float64)
            weights, experts, logits = route(p["router"], x, moe)
            ref_logits, _, ref_top, ref_experts = ref_route(p["router"], x, moe)
            assert logits.dtype == weights.dtype == torch.float64  # at least fp32: float64 stays
            assert torch.equal(experts, ref_experts)
            torch.testing.assert_close(weights, ref_top, **F64_TOL)
            torch.testing.assert_close(logits.double(), ref_logits, **F64_TOL)
            if normalize:
                torch.testing.assert_close(weights.sum(-1), torch.ones(9, dtype=torch.float64))


# --- 2. grouped against loop, float32 ---------------------------------------------------------------


@given(case=routings(widths=st.sampled_from([4, 8, 12])))
@example(case=STARVED_CASE)
def test_grouped_matches_loop_float32(case):
    """implementation="grouped" (torch._grouped_mm) equals "loop" in float32, output and gradients,
    including experts with no tokens."""
    moe, starved = case["moe"], case["starved"]
    x, p = make_inputs(case["seed"], moe, case["shape"], case["d_model"], torch.float32, starved)
    assert grouped_available(x, moe, case["d_model"])
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("loop", "grouped"):
        xi, pi = with_grad(x, p)
        out, aux = moe_feed_forward(pi, xi, dataclasses.replace(moe, implementation=impl), case["activation"])
        results[impl] = out, aux, grads(out, xi, pi, cotangent)
    (loop, loop_aux, loop_g), (grouped, grouped_aux, grouped_g) = results["loop"], results["grouped"]
    for e in starved:
        assert loop_aux["expert_tokens"][e] == 0
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=1e-5)
    assert torch.equal(grouped_aux["expert_tokens"], loop_aux["expert_tokens"])
    assert_grads_close(grouped_g, loop_g, atol=1e-5, rtol=1e-5)


def test_grouped_available_by_dtype_and_width():
    """`grouped_available`: never float64; fp32/bf16 on CPU only with 16-byte-aligned widths."""
    moe = MoeConfig(n_experts=4, top_k=2, hidden=8)
    assert not grouped_available(torch.zeros(3, 8, dtype=torch.float64), moe, 8)
    assert grouped_available(torch.zeros(3, 8), moe, 8)
    assert grouped_available(torch.zeros(3, 8, dtype=torch.bfloat16), moe, 8)
    assert not grouped_available(torch.zeros(3, 6), moe, 6)  # 24 bytes per row
    assert not grouped_available(torch.zeros(3, 8), dataclasses.replace(moe, hidden=6), 8)


# --- 3. capacity factor -----------------------------------------------------------------------------


@given(case=routings(), capacity_factor=st.sampled_from([0.25, 0.5, 0.75, 1.0, 1.5]), hot=st.booleans())
@example(case=STARVED_CASE, capacity_factor=0.5, hot=True)
def test_capacity_matches_naive_reference_float64(case, capacity_factor, hot):
    """With a capacity factor each expert keeps its first C = ceil(cf·T·top_k/n_experts) assignments in
    token order and drops the rest: output, gradients and the dropped count equal the reference."""
    moe = dataclasses.replace(case["moe"], capacity_factor=capacity_factor)
    starved = case["starved"]
    hot_expert = next((e for e in range(moe.n_experts) if e not in starved), None) if hot else None
    x, p = make_inputs(case["seed"], moe, case["shape"], case["d_model"], torch.float64, starved, hot_expert)
    x, p = with_grad(x, p)
    n_tokens = x.numel() // x.shape[-1]
    capacity = math.ceil(capacity_factor * n_tokens * moe.top_k / moe.n_experts)
    assert moe.capacity(n_tokens) == capacity
    want, counts, dropped, _, probs = ref_moe(p, x, moe, case["activation"], capacity)
    assume(top_k_margin(probs.detach(), moe.top_k) > 1e-4)
    if case is STARVED_CASE:
        assert dropped > 0, "the explicit case must overflow an expert"
    got, aux = moe_feed_forward(p, x, moe, case["activation"])
    torch.testing.assert_close(got, want, **F64_TOL)
    assert aux["dropped"].item() == dropped
    assert aux["expert_tokens"].tolist() == counts  # counts all assignments, dropped or not
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_grads_close(grads(got, x, p, cotangent), grads(want, x, p, cotangent), **F64_TOL)


def test_capacity_keeps_earliest_tokens_not_earliest_slots():
    """Token-major order: tokens 0 and 1 pick the overloaded expert 0 in their second slot, tokens 2..7
    in their first; with C = 2, expert 0 keeps tokens 0 and 1 (not the first two slot-0 picks)."""
    moe = MoeConfig(n_experts=4, top_k=2, hidden=4, capacity_factor=0.5, implementation="loop")
    x, p = make_inputs(5, moe, (8,), 4, torch.float64, hot=0)
    x[:, 1] = 0
    x[:2, 1] = 10.0
    p["router"][0, 1] = 0
    p["router"][1] = torch.tensor([0.0, 10.0, 0.0, 0.0], dtype=torch.float64)
    capacity = moe.capacity(8)
    assert capacity == 2
    want, _, dropped, experts, _ = ref_moe(p, x, moe, "silu", capacity)
    assert experts[:2].tolist() == [[1, 0], [1, 0]] and (experts[2:, 0] == 0).all()
    assert dropped >= 6  # expert 0 keeps 2 of its 8
    got, aux = moe_feed_forward(p, x, moe, "silu")
    torch.testing.assert_close(got, want, **F64_TOL)
    assert aux["dropped"].item() == dropped
    dropless = ref_moe(p, x, moe, "silu")[0]
    torch.testing.assert_close(got[:2], dropless[:2], **F64_TOL)  # kept: tokens 0 and 1
    assert not torch.allclose(got[2:4], dropless[2:4], **F64_TOL)  # dropped: the first slot-0 picks


def test_large_capacity_factor_equals_dropless():
    """A capacity of at least T·top_k drops nothing and equals the dropless loop output."""
    moe = MoeConfig(n_experts=5, top_k=2, hidden=6, shared_hidden=3, implementation="loop")
    x, p = make_inputs(2, moe, (2, 6), 7, torch.float64, starved=(3,), hot=1)
    dropless, dropless_aux = moe_feed_forward(p, x, moe)
    capped, capped_aux = moe_feed_forward(
        p, x, dataclasses.replace(moe, capacity_factor=float(moe.n_experts))
    )
    assert capped_aux["dropped"].item() == 0
    torch.testing.assert_close(capped, dropless, atol=1e-12, rtol=1e-12)
    assert torch.equal(capped_aux["expert_tokens"], dropless_aux["expert_tokens"])


# --- 4. auxiliary sums ------------------------------------------------------------------------------


@given(case=routings())
def test_aux_sums_match_naive_formulas(case):
    """lb_sum / tokens is the Switch/OLMoE loss, router_z_sum is Σ_t logsumexp(logits_t)², expert_tokens
    the bincount of all assignments, tokens the token count; lb and z gradients w.r.t. the router too.
    For softmax scores lb equals transformers' OLMoE load_balancing_loss_func."""
    moe, starved = case["moe"], case["starved"]
    x, p = make_inputs(case["seed"], moe, case["shape"], case["d_model"], torch.float64, starved)
    x, p = with_grad(x, p)
    xs = x.reshape(-1, x.shape[-1])
    n_tokens = xs.shape[0]
    logits, probs, _, experts = ref_route(p["router"], xs, moe)
    assume(top_k_margin(probs.detach(), moe.top_k) > 1e-4)
    _, aux = moe_feed_forward(p, x, moe, case["activation"])
    assert aux["tokens"].item() == n_tokens
    assert aux["expert_tokens"].tolist() == [(experts == e).sum().item() for e in range(moe.n_experts)]
    lb = ref_lb_loss(probs, experts, moe.n_experts, moe.score)
    z = sum(torch.log(torch.exp(logits[t]).sum()) ** 2 for t in range(n_tokens))
    torch.testing.assert_close(aux["lb_sum"].double() / n_tokens, lb.detach(), **F64_TOL)
    torch.testing.assert_close(aux["router_z_sum"].double(), z.detach(), **F64_TOL)
    got_g = torch.autograd.grad(aux["lb_sum"] + 0.1 * aux["router_z_sum"], p["router"])[0]
    want_g = torch.autograd.grad(lb * n_tokens + 0.1 * z, p["router"])[0]
    torch.testing.assert_close(got_g, want_g, atol=1e-5, rtol=1e-4)
    if moe.score == "softmax":
        olmoe = pytest.importorskip("transformers.models.olmoe.modeling_olmoe")
        hf = olmoe.load_balancing_loss_func((logits.detach(),), num_experts=moe.n_experts, top_k=moe.top_k)
        torch.testing.assert_close(aux["lb_sum"].double() / n_tokens, hf.double(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (6, 3), (8, 2)])
def test_uniform_routing_balancing_loss_is_top_k(score, n_experts, top_k):
    """A perfectly balanced routing (every expert chosen equally often, equal mean probability) gives a
    load-balancing loss of exactly top_k. Token t prefers experts t, t+1, … (mod n) via a circulant
    router over one-hot tokens."""
    pattern = torch.linspace(2.0, -2.0, n_experts, dtype=torch.float64)
    router = torch.stack([pattern.roll(e) for e in range(n_experts)])  # router[e, t] = pattern[(e - t) % n]
    x = torch.eye(n_experts, dtype=torch.float64)
    moe = MoeConfig(n_experts=n_experts, top_k=top_k, hidden=4, score=score)
    _, experts, logits = route(router, x, moe)
    assert experts[:, 0].tolist() == list(range(n_experts))
    lb_sum, _, counts = balancing_sums(logits, experts, moe)
    assert counts.tolist() == [top_k] * n_experts
    assert lb_sum.item() / n_experts == pytest.approx(top_k, rel=1e-6)


# --- 5. negative controls ---------------------------------------------------------------------------


def test_negative_controls_reference_can_fail():
    """The comparison is not vacuous: a reference with one used expert's weight perturbed, or with the
    wrong top_k, or a capacity reference that keeps the latest tokens, is NOT close to the output."""
    moe = MoeConfig(n_experts=4, top_k=2, hidden=4, implementation="loop")
    x, p = make_inputs(9, moe, (6,), 5, torch.float64)
    got, _ = moe_feed_forward(p, x, moe)
    want, counts, _, _, _ = ref_moe(p, x, moe, "silu")
    torch.testing.assert_close(got, want, **F64_TOL)

    used = max(range(moe.n_experts), key=lambda e: counts[e])
    bad = {**p, "experts": {**p["experts"], "w2": p["experts"]["w2"].clone()}}
    bad["experts"]["w2"][used] *= 1.01
    assert not torch.allclose(got, ref_moe(bad, x, moe, "silu")[0], **F64_TOL)
    wrong_k = dataclasses.replace(moe, top_k=1)
    assert not torch.allclose(got, ref_moe(p, x, wrong_k, "silu")[0], **F64_TOL)

    capped = dataclasses.replace(moe, capacity_factor=0.5)
    x, p = make_inputs(9, capped, (6,), 5, torch.float64, hot=2)
    got, _ = moe_feed_forward(p, x, capped)
    want, _, dropped, _, _ = ref_moe(p, x, capped, "silu", capped.capacity(6))
    assert dropped > 0
    torch.testing.assert_close(got, want, **F64_TOL)
    reversed_want = ref_moe(p, x.flip(0), capped, "silu", capped.capacity(6))[0].flip(0)
    assert not torch.allclose(got, reversed_want, **F64_TOL)
