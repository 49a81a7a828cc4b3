"""The whole model: init, presets, config validation, logits against the naive reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from olmo_fn.errors import ConfigError
from olmo_fn.graph import PRESETS, ModelConfig, get_preset, init_params, logits
from olmo_fn.graph.flops import count_params, flops_per_token
from olmo_fn.graph.param_tree import flatten, param_shapes

import reference as ref

SMALL = ModelConfig(
    d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48, vocab_size=40, rope_theta=1e4
)


def test_init_is_deterministic_and_order_independent():
    a = flatten(init_params(SMALL, seed=3))
    b = flatten(init_params(SMALL, seed=3))
    c = flatten(init_params(SMALL, seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embeddings"], c["embeddings"])
    # A layer's values do not depend on how many layers exist (pipeline stages see the same numbers).
    deeper = flatten(init_params(ModelConfig(**{**SMALL.__dict__, "n_layers": 5}), seed=3))
    assert torch.equal(deeper["blocks.1.attention.w_q"], a["blocks.1.attention.w_q"])
    assert not torch.equal(a["blocks.0.attention.w_q"], a["blocks.1.attention.w_q"])


def test_init_statistics_and_shapes():
    cfg = ModelConfig(d_model=256, n_layers=1, n_heads=4, n_kv_heads=4, mlp_hidden=512, vocab_size=1000)
    flat = flatten(init_params(cfg, seed=0))
    assert {k: tuple(v.shape) for k, v in flat.items()} == param_shapes(cfg)
    matrices = torch.cat([v.flatten() for v in flat.values() if v.ndim == 2])
    assert matrices.mean().abs() < 1e-3
    assert matrices.std().item() == pytest.approx(0.02, rel=0.01)
    assert all(torch.all(v == 1) for v in flat.values() if v.ndim == 1)


def test_init_on_meta_makes_shapes_only():
    params = init_params(PRESETS["olmo2-7b"], device="meta", dtype=torch.bfloat16)
    leaves = flatten(params)
    assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in leaves.values())
    assert sum(t.numel() for t in leaves.values()) == count_params(PRESETS["olmo2-7b"])


@pytest.mark.parametrize(
    "name,published",
    [("olmo2-1b", 1.62e9), ("olmo2-7b", 7.30e9), ("olmo2-13b", 13.7e9), ("olmo2-32b", 32.2e9)],
)
def test_preset_parameter_counts_match_published_sizes(name, published):
    assert count_params(PRESETS[name]) == pytest.approx(published, rel=0.01)


def test_flops_per_token_formula():
    cfg = SMALL
    matmul = 4 * 32 * 32 - 2 * 2 * 32 * 8 + 3 * 32 * 48  # q,out full; k,v at half the heads; mlp
    expected = 6 * (2 * matmul + 40 * 32) + 12 * 2 * 4 * 8 * 100
    assert flops_per_token(cfg, 100) == expected


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match="olmo2-1b"):
        get_preset("olmo2-2b")


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"n_heads": 5}, "model.n_heads=5 does not divide model.d_model=32"),
        ({"n_kv_heads": 3}, "model.n_kv_heads=3 does not divide model.n_heads=4"),
        ({"d_model": 36, "n_heads": 4}, "must be even"),
        ({"vocab_size": 0}, "model.vocab_size=0"),
        ({"norm_eps": 0.0}, "model.norm_eps"),
    ],
)
def test_invalid_model_configs_name_the_field(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{**SMALL.__dict__, **fields})


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_logits_match_reference_with_document_mask(backend, gen):
    params = ref.perturbed_params(SMALL, seed=1)
    ids = torch.randint(0, 40, (2, 19), generator=gen)
    doc_ids = ref.random_doc_ids(2, 19, gen)
    positions = torch.randint(0, 30, (2, 19), generator=gen)
    if backend == "flex":  # FlexAttention runs in fp32 only on CPU
        params = params.apply(lambda t: t.float())
    out = logits(params, ids, SMALL, positions=positions, doc_ids=doc_ids, backend=backend)
    expected = ref.logits(params, ids, positions, doc_ids, SMALL)
    tol = 1e-6 if backend == "sdpa" else 1e-4  # RoPE tables are fp32 by contract
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_logits_default_to_causal_with_sequence_positions(gen):
    params = ref.perturbed_params(SMALL, seed=2)
    ids = torch.randint(0, 40, (1, 12), generator=gen)
    expected = ref.logits(params, ids, torch.arange(12)[None], torch.zeros(1, 12, dtype=torch.long), SMALL)
    torch.testing.assert_close(logits(params, ids, SMALL), expected)


def test_documents_do_not_see_each_other(gen):
    """Changing an earlier document leaves a later document's logits unchanged (per-document positions)."""
    params = init_params(SMALL, seed=0)
    ids = torch.randint(0, 40, (1, 16), generator=gen)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10])
    positions = torch.tensor([list(range(6)) + list(range(10))])
    other = ids.clone()
    other[0, :6] = torch.randint(0, 40, (6,), generator=gen)
    a = logits(params, ids, SMALL, positions=positions, doc_ids=doc_ids)
    b = logits(params, other, SMALL, positions=positions, doc_ids=doc_ids)
    torch.testing.assert_close(a[0, 6:], b[0, 6:])
    # ... and equal the logits of the later document run on its own.
    alone = logits(params, ids[:, 6:], SMALL)
    torch.testing.assert_close(a[0, 6:], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0, :6], b[0, :6])


def test_layer_windows_follow_the_pattern_with_a_full_last_layer():
    cfg = ModelConfig(
        d_model=32, n_layers=6, n_heads=4, n_kv_heads=4, mlp_hidden=8, vocab_size=8, window_pattern=(3, 3, 0)
    )
    assert cfg.layer_windows == (3, 3, 0, 3, 3, 0)
    assert dataclasses.replace(cfg, n_layers=5).layer_windows == (3, 3, 0, 3, 0)
    assert dataclasses.replace(cfg, n_layers=5, full_last_layer=False).layer_windows == (3, 3, 0, 3, 3)
    assert PRESETS["olmo3-32b"].layer_windows == (4096, 4096, 4096, 0) * 16
    assert PRESETS["olmo3-190m"].layer_windows == (4096, 4096, 4096, 0) * 3
    # OLMo 3 32B has 32.2 B parameters (with the 100,352-row vocabulary)
    from olmo_fn.graph.flops import count_params

    assert 32.1e9 < count_params(PRESETS["olmo3-32b"]) < 32.3e9
    assert PRESETS["olmo3-7b"].layer_windows == (4096, 4096, 4096, 0) * 8
    with pytest.raises(ConfigError, match="model.window_pattern"):
        dataclasses.replace(cfg, window_pattern=(3, -1))


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("with_documents", [True, False])
def test_sliding_window_logits_match_reference(backend, with_documents, gen):
    cfg = dataclasses.replace(SMALL, n_layers=3, window_pattern=(4, 0, 7), full_last_layer=False)
    params = ref.perturbed_params(cfg, seed=3).apply(lambda t: t.float() if backend == "flex" else t)
    ids = torch.randint(0, 40, (2, 21), generator=gen)
    doc_ids = ref.random_doc_ids(2, 21, gen, p_boundary=0.1) if with_documents else None
    out = logits(params, ids, cfg, doc_ids=doc_ids, backend=backend)
    positions = torch.arange(21).expand(2, 21)
    expected = ref.logits(params, ids, positions, doc_ids if with_documents else torch.zeros_like(ids), cfg)
    tol = 1e-6 if backend == "sdpa" else 1e-4
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_tied_embeddings_are_one_matrix_used_twice(gen):
    """Tied: no lm_head.w_out; logits equal the naive reference, and the embedding's gradient is the sum
    of what an untied model with the same matrix in both places gives its two copies."""
    tied_cfg = dataclasses.replace(SMALL, tie_embeddings=True)
    assert "lm_head.w_out" not in param_shapes(tied_cfg)
    tied = init_params(tied_cfg, seed=1).apply(lambda t: t.double().requires_grad_(True))
    ids = torch.randint(0, SMALL.vocab_size, (2, 9), generator=gen)
    positions = torch.arange(9).expand(2, 9)
    out = logits(tied, ids, tied_cfg)
    expected = ref.logits(tied, ids, positions, torch.zeros_like(ids), tied_cfg)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)  # fp32 RoPE tables, as above

    untied = init_params(SMALL, seed=1).apply(lambda t: t.double())
    for path, value in flatten(tied).items():
        untied.set(tuple(path.split(".")), value.detach().clone())
    untied.set(("lm_head", "w_out"), tied["embeddings"].detach().clone())
    untied = untied.apply(lambda t: t.requires_grad_(True))
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * weights).sum().backward()
    (logits(untied, ids, SMALL) * weights).sum().backward()
    both = untied["embeddings"].grad + untied["lm_head"]["w_out"].grad
    torch.testing.assert_close(tied["embeddings"].grad, both, atol=1e-10, rtol=1e-10)
