"""Functional Lion and Muon against naive references and against torch.optim.Muon / AdamW."""

from __future__ import annotations

import fnmatch
import math

import pytest
import torch

from olmo_fn.errors import ConfigError
from olmo_fn.graph import ModelConfig, init_params
from olmo_fn.graph.param_tree import flatten, unflatten
from olmo_fn.state.lion import init_lion_state, lion_update
from olmo_fn.state.muon import init_muon_state, is_muon_matrix, muon_update, orthogonalise

CFG = ModelConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=24, vocab_size=30)
NO_DECAY = ("embeddings", "*norm", "*.w_v")  # w_v: a Muon matrix without weight decay


def decays_by_pattern(path: str) -> bool:
    return not any(fnmatch.fnmatchcase(path, pattern) for pattern in NO_DECAY)


# ---------------------------------------------------------------------------------------------- Lion


def naive_lion(p, m, g, *, lr, beta1, beta2, wd):
    """One Lion step on flat lists of Python floats, element by element; returns new (p, m)."""
    new_p, new_m = [], []
    for pi, mi, gi in zip(p, m, g, strict=True):
        c = beta1 * mi + (1 - beta1) * gi
        sign = (c > 0) - (c < 0)
        new_p.append(pi * (1 - lr * wd) - lr * sign)
        new_m.append(beta2 * mi + (1 - beta2) * gi)
    return new_p, new_m


@pytest.mark.parametrize(
    "weight_decay,decays",
    [(0.0, lambda path: True), (0.4, lambda path: True), (0.4, decays_by_pattern)],
    ids=["no-wd", "wd-everywhere", "wd-groups"],
)
def test_lion_matches_naive_reference(weight_decay, decays, gen):
    params = init_params(CFG, seed=0).apply(lambda t: t.double())
    state = init_lion_state(params)
    assert {k: v.dtype for k, v in flatten(state["exp_avg"]).items()} == {
        k: torch.float64 for k in flatten(params)
    }
    ref_p = {k: v.flatten().tolist() for k, v in flatten(params).items()}
    ref_m = {k: [0.0] * len(v) for k, v in ref_p.items()}
    for step in range(1, 5):
        lr = 1e-2 * (0.5 + 0.1 * step)
        grads = {
            k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in flatten(params).items()
        }
        if step == 3:  # an exact zero gradient: sign(0) = 0 once momentum is zero there too
            grads["lm_head.norm"].zero_()
        params, state = lion_update(
            params, grads, state, lr=lr, beta1=0.8, beta2=0.97, weight_decay=weight_decay, decays=decays
        )
        for k in ref_p:
            wd = weight_decay if decays(k) else 0.0
            g = grads[k].flatten().tolist()
            ref_p[k], ref_m[k] = naive_lion(ref_p[k], ref_m[k], g, lr=lr, beta1=0.8, beta2=0.97, wd=wd)
        for k, p in flatten(params).items():
            torch.testing.assert_close(
                p.flatten(), torch.tensor(ref_p[k], dtype=torch.float64), atol=1e-12, rtol=0
            )
        for k, m in flatten(state["exp_avg"]).items():
            torch.testing.assert_close(
                m.flatten(), torch.tensor(ref_m[k], dtype=torch.float64), atol=1e-12, rtol=0
            )


def test_lion_bf16_params_keep_fp32_momentum(gen):
    params = init_params(CFG, seed=0).apply(lambda t: t.bfloat16())
    state = init_lion_state(params)
    assert all(m.dtype == torch.float32 for m in flatten(state["exp_avg"]).values())
    before = {k: v.double() for k, v in flatten(params).items()}
    grads = {k: torch.randn(v.shape, generator=gen).bfloat16() for k, v in before.items()}
    lion_update(params, grads, state, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0, decays=lambda k: True)
    for k, p in flatten(params).items():
        assert p.dtype == torch.bfloat16
        # First step from zero momentum: p - lr * sign(g), up to bf16 rounding of the result.
        torch.testing.assert_close(
            p.double(), before[k] - 1e-2 * grads[k].double().sign(), atol=1e-2, rtol=1e-2
        )
        torch.testing.assert_close(flatten(state["exp_avg"])[k], 0.01 * grads[k].float())


def test_lion_rejects_bad_hyperparameters():
    params = init_params(CFG, seed=0)
    with pytest.raises(ConfigError, match="beta2=1.0"):
        lion_update(
            params, {}, init_lion_state(params), lr=1e-3, beta1=0.9, beta2=1.0, weight_decay=0.0, decays=bool
        )


# ------------------------------------------------------------------------------------ orthogonalise


def naive_newton_schulz(g, steps, a=3.4445, b=-4.7750, c=2.0315, eps=1e-7):
    """Written from the definition, without transposing: for a tall matrix the Gram matrix is
    formed on the right (``X (XᵀX)``), which is the same iteration on ``Xᵀ``."""
    x = g / max(math.sqrt(float((g * g).sum())), eps)
    for _ in range(steps):
        if g.shape[0] > g.shape[1]:
            gram = x.T @ x
            x = a * x + b * (x @ gram) + c * (x @ gram @ gram)
        else:
            gram = x @ x.T
            x = a * x + b * (gram @ x) + c * (gram @ gram @ x)
    return x


@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (12, 12)])
@pytest.mark.parametrize("steps", [1, 5])
def test_orthogonalise_matches_naive_iteration_in_float64(shape, steps, gen):
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    original = g.clone()
    out = orthogonalise(g, steps, compute_dtype=torch.float64)
    assert out.shape == g.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, naive_newton_schulz(g, steps), atol=1e-12, rtol=0)
    assert torch.equal(g, original)  # the input is not modified


# The quintic iteration's fixed band: singular values of the result settle in about [0.682, 1.134]
# (float64); bf16 arithmetic widens it to about [0.675, 1.145]. The bounds below allow that, and no
# more: exact orthogonality (all 1) is not what the iteration computes.
BAND = {torch.float64: (0.67, 1.15), torch.bfloat16: (0.66, 1.16)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,steps",
    [((32, 128), 5), ((128, 32), 5), ((64, 64), 30)],
    ids=["wide-5-steps", "tall-5-steps", "square-30-steps"],
)
def test_orthogonalise_singular_values_near_one(dtype, shape, steps, gen):
    """5 steps suffice for well-conditioned (strongly rectangular) Gaussian matrices; a square one has
    tiny singular values that need more steps to grow into the band."""
    low, high = BAND[dtype]
    for _ in range(5):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        out = orthogonalise(g, steps, compute_dtype=dtype).double()
        s = torch.linalg.svdvals(out)
        assert low <= s.min() and s.max() <= high, (s.min().item(), s.max().item())
        if dtype == torch.float64:
            # Same singular vectors as g (result is U f(S) Vᵀ): gᵀ out = V S f(S) Vᵀ is symmetric PSD.
            prod = g.T @ out
            torch.testing.assert_close(prod, prod.T, atol=1e-10, rtol=0)
            assert torch.linalg.eigvalsh(prod).min() > -1e-10


def test_orthogonalise_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        orthogonalise(torch.ones(3))


# --------------------------------------------------------------------------------------------- Muon


def test_muon_state_layout():
    params = init_params(CFG, seed=0)
    flat = flatten(params)
    assert is_muon_matrix("blocks.0.attention.w_q", flat["blocks.0.attention.w_q"])
    assert is_muon_matrix("blocks.1.feed_forward.w2", flat["blocks.1.feed_forward.w2"])
    for path in (
        "embeddings",
        "lm_head.w_out",
        "lm_head.norm",
        "blocks.0.attention_norm",
        "blocks.0.attention.q_norm",
    ):
        assert not is_muon_matrix(path, flat[path])
    state = init_muon_state(params)
    assert set(state.keys()) == {"momentum", "exp_avg", "exp_avg_sq"}
    muon = flatten(state["momentum"])
    adamw = flatten(state["exp_avg"])
    assert set(muon) == {k for k in flat if k.startswith("blocks.") and flat[k].ndim == 2}
    assert len(muon) == 2 * 7
    assert set(adamw) == set(flatten(state["exp_avg_sq"])) == set(flat) - set(muon)
    for k, t in {**muon, **adamw}.items():
        assert t.shape == flat[k].shape and t.dtype == torch.float32 and not t.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_optim_muon_and_adamw(dtype, adjust_lr, nesterov, gen):
    params = init_params(CFG, seed=0).apply(lambda t: t.to(dtype))
    flat = flatten(params)
    torch_params = {k: v.clone().requires_grad_(True) for k, v in flat.items()}

    def groups(muon_side: bool, wd: float):
        chosen = {k: p for k, p in torch_params.items() if is_muon_matrix(k, p) == muon_side}
        decay = [p for k, p in chosen.items() if decays_by_pattern(k)]
        no_decay = [p for k, p in chosen.items() if not decays_by_pattern(k)]
        assert decay and no_decay
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    ref_muon = torch.optim.Muon(
        groups(True, 0.2), lr=0.02, momentum=0.9, nesterov=nesterov, ns_steps=5, adjust_lr_fn=adjust_lr
    )
    ref_adamw = torch.optim.AdamW(groups(False, 0.3), lr=3e-3, betas=(0.8, 0.9), eps=1e-7, foreach=False)
    state = init_muon_state(params)
    for step in range(1, 4):
        scale = 0.5 + 0.1 * step  # both learning rates change between steps, as under a schedule
        grads = {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in flat.items()}
        params, state = muon_update(
            params,
            grads,
            state,
            step=step,
            lr=0.02 * scale,
            momentum=0.9,
            nesterov=nesterov,
            ns_steps=5,
            weight_decay=0.2,
            adjust_lr=adjust_lr,
            adamw_lr=3e-3 * scale,
            adamw_betas=(0.8, 0.9),
            adamw_eps=1e-7,
            adamw_weight_decay=0.3,
            decays=decays_by_pattern,
        )
        for opt, base in ((ref_muon, 0.02), (ref_adamw, 3e-3)):
            for group in opt.param_groups:
                group["lr"] = base * scale
        for k, p in torch_params.items():
            p.grad = grads[k].clone()
        ref_muon.step()
        ref_adamw.step()
        # Both sides run the same bf16 Newton–Schulz arithmetic, so the results agree to rounding.
        for k, p in flatten(params).items():
            torch.testing.assert_close(
                p, torch_params[k].detach(), atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}"
            )
        for k, buf in flatten(state["momentum"]).items():
            expected = ref_muon.state[torch_params[k]]["momentum_buffer"]
            torch.testing.assert_close(buf, expected, atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        for k, m in flatten(state["exp_avg"]).items():
            torch.testing.assert_close(m, ref_adamw.state[torch_params[k]]["exp_avg"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_muon_float64_newton_schulz_matches_naive_reference(adjust_lr, gen):
    """With ``ns_dtype=float64`` the Muon side equals its definition, written out in float64."""
    shapes = {
        "blocks.0.attention.w_q": (8, 20),
        "blocks.0.feed_forward.w2": (20, 8),
        "blocks.1.attention.w_v": (12, 12),
    }
    params = unflatten({k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()})
    ref = {k: v.clone() for k, v in flatten(params).items()}
    bufs = {k: torch.zeros_like(v) for k, v in ref.items()}
    state = init_muon_state(params)
    mu, wd = 0.9, 0.2
    for step in range(1, 4):
        lr = 0.02 * (0.5 + 0.1 * step)
        grads = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
        muon_update(
            params, grads, state, step=step, lr=lr, momentum=mu, ns_dtype=torch.float64, weight_decay=wd,
            adjust_lr=adjust_lr, adamw_lr=0.0, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, adamw_weight_decay=0.0,
            decays=decays_by_pattern,
        )  # fmt: skip
        for k, (rows, cols) in shapes.items():
            bufs[k] = mu * bufs[k] + (1 - mu) * grads[k]
            direction = (1 - mu) * grads[k] + mu * bufs[k]
            scale = (
                math.sqrt(max(1, rows / cols))
                if adjust_lr == "original"
                else 0.2 * math.sqrt(max(rows, cols))
            )
            decay = wd if decays_by_pattern(k) else 0.0
            ref[k] = ref[k] * (1 - lr * decay) - lr * scale * naive_newton_schulz(direction, 5)
        for k, p in flatten(params).items():
            torch.testing.assert_close(p, ref[k], atol=1e-12, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
            torch.testing.assert_close(flatten(state["momentum"])[k], bufs[k], atol=1e-12, rtol=0)


def test_muon_rejects_bad_hyperparameters():
    params = init_params(CFG, seed=0)
    kwargs = dict(
        step=1, lr=0.02, weight_decay=0.1, adamw_lr=1e-3, adamw_betas=(0.9, 0.95), adamw_eps=1e-8,
        adamw_weight_decay=0.1, decays=decays_by_pattern,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="adjust_lr='rms'"):
        muon_update(params, {}, init_muon_state(params), adjust_lr="rms", **kwargs)
    with pytest.raises(ConfigError, match="momentum=1.0"):
        muon_update(params, {}, init_muon_state(params), momentum=1.0, **kwargs)
    with pytest.raises(ConfigError, match="beta2=1.0"):
        muon_update(params, {}, init_muon_state(params), **{**kwargs, "adamw_betas": (0.9, 1.0)})
