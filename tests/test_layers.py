"""Graph building blocks against the naive float64 references in tests/reference.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from olmo_fn.graph import ModelConfig
from olmo_fn.graph.attention import attend, attention
from olmo_fn.graph.block import pre_norm_block, reordered_norm_block
from olmo_fn.graph.feed_forward import gated_mlp
from olmo_fn.graph.loss import cross_entropy_sums
from olmo_fn.graph.norms import rms_norm
from olmo_fn.graph.rope import apply_rope, rope_tables

import reference as ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rms_norm_matches_reference(dtype, gen):
    x = (torch.randn(3, 5, 16, generator=gen) * 3).to(dtype)
    w = torch.randn(16, generator=gen)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref.rms_norm(x, w, 1e-6), atol=tol, rtol=tol)


@given(seq=st.integers(1, 12), heads=st.integers(1, 3), half=st.integers(1, 8), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_rope_matches_complex_rotation(seq, heads, half, seed):
    gen = torch.Generator().manual_seed(seed)
    d = 2 * half
    x = torch.randn(2, seq, heads, d, generator=gen, dtype=torch.float64)
    positions = torch.randint(0, 5000, (2, seq), generator=gen)
    cos, sin = rope_tables(positions, d, theta=500_000.0)
    assert cos.dtype == torch.float32
    out = apply_rope(x, cos, sin)
    # The tables are fp32 by contract, so angles carry fp32 rounding of position * frequency.
    torch.testing.assert_close(out, ref.rope(x, positions, 500_000.0), atol=2e-3, rtol=0)


def test_rope_preserves_norm_and_relative_positions(gen):
    """Rotations keep vector norms, and q·k depends only on the position difference."""
    d = 8
    q = torch.randn(1, 1, 1, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, d, generator=gen, dtype=torch.float64)

    def dot(pq, pk):
        cq, sq = rope_tables(torch.tensor([[pq]]), d, 10_000.0)
        ck, sk = rope_tables(torch.tensor([[pk]]), d, 10_000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-5)
    c, s = rope_tables(torch.tensor([[123]]), d, 10_000.0)
    assert apply_rope(q, c, s).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_attend_with_dense_mask_matches_reference(heads, kv_heads, gen):
    b, s, d = 2, 13, 8
    q = torch.randn(b, heads, s, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, kv_heads, s, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, kv_heads, s, d, generator=gen, dtype=torch.float64)
    doc_ids = ref.random_doc_ids(b, s, gen)
    mask = ref.allowed(doc_ids)
    out = attend(q, k, v, mask[:, None])
    torch.testing.assert_close(out, ref.attend(q, k, v, mask))


def test_attend_without_mask_is_causal(gen):
    q, k, v = (torch.randn(1, 2, 9, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    causal = ref.allowed(torch.zeros(1, 9, dtype=torch.long))
    torch.testing.assert_close(attend(q, k, v, None), ref.attend(q, k, v, causal))


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_attention_sublayer_matches_reference(qk_norm, heads, kv_heads, gen):
    cfg = ModelConfig(
        d_model=32,
        n_layers=1,
        n_heads=heads,
        n_kv_heads=kv_heads,
        mlp_hidden=48,
        vocab_size=50,
        qk_norm=qk_norm,
        rope_theta=1000.0,
    )
    p = ref.perturbed_params(cfg)["blocks", "0", "attention"]
    x = torch.randn(2, 11, 32, generator=gen, dtype=torch.float64)
    doc_ids = ref.random_doc_ids(2, 11, gen)
    positions = torch.randint(0, 50, (2, 11), generator=gen)
    rope = rope_tables(positions, cfg.d_head, cfg.rope_theta)
    out = attention(p, x, rope, ref.allowed(doc_ids)[:, None], cfg)
    torch.testing.assert_close(
        out, ref.attention(p, x, positions, ref.allowed(doc_ids), cfg), atol=1e-5, rtol=1e-5
    )


def test_swiglu_matches_reference(gen):
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=40, vocab_size=10)
    p = ref.perturbed_params(cfg)["blocks", "0", "feed_forward"]
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(gated_mlp(p, x, "silu"), ref.swiglu(p, x))


def test_reordered_norm_block_matches_reference(gen):
    cfg = ModelConfig(
        d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_hidden=64, vocab_size=10, rope_theta=1e4
    )
    p = ref.perturbed_params(cfg)["blocks", "0"]
    x = torch.randn(2, 9, 32, generator=gen, dtype=torch.float64)
    doc_ids = ref.random_doc_ids(2, 9, gen)
    positions = torch.arange(9).expand(2, 9)
    rope = rope_tables(positions, cfg.d_head, cfg.rope_theta)
    out = reordered_norm_block(p, x, rope, ref.allowed(doc_ids)[:, None], cfg)
    torch.testing.assert_close(
        out, ref.block(p, x, positions, ref.allowed(doc_ids), cfg), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_sums_match_reference(dtype, gen):
    logits = (torch.randn(2, 6, 11, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, 11, (2, 6), generator=gen)
    labels[0, 2] = labels[1, 5] = labels[1, 0] = -100
    ce, z, n = cross_entropy_sums(logits, labels)
    ref_ce, ref_z, ref_n = ref.cross_entropy_sums(logits, labels)
    assert ce.dtype == z.dtype == torch.float32
    assert int(n) == ref_n == 9
    assert ce.item() == pytest.approx(ref_ce, rel=1e-5)
    assert z.item() == pytest.approx(ref_z, rel=1e-5)


def test_cross_entropy_all_ignored_is_zero():
    ce, z, n = cross_entropy_sums(torch.randn(1, 3, 5), torch.full((1, 3), -100))
    assert ce.item() == z.item() == 0.0 and int(n) == 0


def test_cross_entropy_gradient_matches_softmax_minus_onehot(gen):
    logits = torch.randn(1, 4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 6, 0]])
    ce, _, _ = cross_entropy_sums(logits, labels)
    (grad,) = torch.autograd.grad(ce, logits)
    expected = torch.softmax(logits.detach().float(), -1).double()
    expected[0, [0, 2, 3], [1, 6, 0]] -= 1
    expected[0, 1] = 0
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def test_pre_norm_block_matches_reference(gen):
    cfg = ModelConfig(
        d_model=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=1,
        mlp_hidden=64,
        vocab_size=10,
        qk_norm=False,
        block="pre_norm",
        norm_eps=1e-5,
    )
    p = ref.perturbed_params(cfg)["blocks", "0"]
    x = torch.randn(2, 9, 32, generator=gen, dtype=torch.float64)
    doc_ids = ref.random_doc_ids(2, 9, gen)
    positions = torch.arange(9).expand(2, 9)
    rope = rope_tables(positions, cfg.d_head, cfg.rope_theta)
    out = pre_norm_block(p, x, rope, ref.allowed(doc_ids)[:, None], cfg)
    torch.testing.assert_close(
        out, ref.block(p, x, positions, ref.allowed(doc_ids), cfg), atol=1e-5, rtol=1e-5
    )
