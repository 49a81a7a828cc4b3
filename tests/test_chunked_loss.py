"""The chunked LM head + loss equals the whole-logits loss: values and gradients, in float64, on
shapes and chunk sizes drawn by hypothesis, with ignored positions and any z-loss weight."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.init import init_params
from olmo_fn.graph.loss import IGNORE_INDEX, linear_cross_entropy_sums
from olmo_fn.graph.model import loss_sums


def naive_sums(h, w, labels):
    """Cross-entropy and z-loss sums written out position by position from the full logits."""
    logits = h @ w.T
    ce = z = logits.sum() * 0  # zero, but in the graph when every position is ignored
    for t in range(labels.numel()):
        label = int(labels.reshape(-1)[t])
        if label == IGNORE_INDEX:
            continue
        row = logits.reshape(-1, logits.shape[-1])[t]
        lse = row.exp().sum().log()
        ce = ce + lse - row[label]
        z = z + lse**2
    return ce, z


@given(
    rows=st.integers(1, 3),
    seq=st.integers(1, 9),
    d=st.integers(1, 6),
    vocab=st.integers(2, 17),
    chunk=st.integers(1, 12),
    ignore_share=st.floats(0, 1),
    z_weight=st.floats(0, 2),
    seed=st.integers(0, 2**16),
)
def test_chunked_loss_equals_the_whole_logits(rows, seq, d, vocab, chunk, ignore_share, z_weight, seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, seq, d, dtype=torch.float64, generator=gen) * 3
    w = torch.randn(vocab, d, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[torch.rand(rows, seq, generator=gen) < ignore_share] = IGNORE_INDEX
    weights = torch.randn(2, dtype=torch.float64, generator=gen)  # any weights of the two sums

    def objective(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        ce, z = fn(hh, ww)[:2]
        (weights[0] * ce + z_weight * weights[1] * z).backward()
        return ce.detach(), z.detach(), hh.grad, ww.grad

    expected = objective(lambda hh, ww: naive_sums(hh, ww, labels))
    got = objective(lambda hh, ww: linear_cross_entropy_sums(hh, ww, labels, chunk))
    for name, e, g in zip(("ce_sum", "z_sum", "grad h", "grad w"), expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)
    _, _, n = linear_cross_entropy_sums(h, w, labels, chunk)
    assert n == (labels != IGNORE_INDEX).sum()


def test_model_loss_is_the_same_chunked_or_not():
    """The whole model, float64: chunking the loss changes nothing in the losses or any gradient."""
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48, vocab_size=50)
    params = init_params(cfg, seed=0).apply(lambda t: t.to(torch.float64))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 13), generator=gen)
    labels = torch.randint(0, 50, (2, 13), generator=gen)
    labels[:, -1] = IGNORE_INDEX
    leaves = [t.requires_grad_() for t in params.flatten_keys(".").values()]

    def run(chunk):
        ce, z, n = loss_sums(params, ids, labels, cfg, loss_chunk_tokens=chunk)
        grads = torch.autograd.grad(ce + 0.3 * z, leaves)
        return (ce.detach(), z.detach(), n, *grads)

    for e, g in zip(run(None), run(5), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_bfloat16_chunked_loss_is_close_to_the_whole_logits():
    """bf16 matmuls per chunk: the sums and gradients stay within bf16 rounding of the unchunked ones."""
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(64, 32, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(300, 32, generator=gen).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (64,), generator=gen)
    from olmo_fn.graph.loss import cross_entropy_sums

    ce, z, _ = cross_entropy_sums(h @ w.T, labels)
    expected = (ce, z, *torch.autograd.grad(ce + 1e-4 * z, (h, w)))
    ce, z, _ = linear_cross_entropy_sums(h, w, labels, 16)
    got = (ce, z, *torch.autograd.grad(ce + 1e-4 * z, (h, w)))
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)


def test_pipeline_parallel_accepts_loss_chunks():
    """Chunks are a setting of the last stage's loss like any other: accepted under pipeline
    parallelism, and chosen automatically by one rule (the PP properties check the values)."""
    from olmo_fn.config import TrainConfig
    from olmo_fn.parallelize.parallel_config import ParallelConfig
    from olmo_fn.runtime import AUTO_LOSS_CHUNK_TOKENS, resolve_loss_chunk

    assert TrainConfig(parallel=ParallelConfig(pp=2), loss_chunk_tokens=64).loss_chunk_tokens == 64
    assert resolve_loss_chunk(None, 8192, 100_352) == AUTO_LOSS_CHUNK_TOKENS  # above the threshold
    assert resolve_loss_chunk(None, 256, 4096) is None
