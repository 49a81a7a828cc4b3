"""Logits equal Hugging Face transformers' Olmo2ForCausalLM on the same random weights."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from olmo_fn.errors import CheckpointError  # noqa: E402
from olmo_fn.graph import ModelConfig, logits  # noqa: E402
from olmo_fn.graph.param_tree import flatten  # noqa: E402
from olmo_fn.io.hf_mapping import (  # noqa: E402
    hf_olmo2_config,
    hf_olmo2_to_params,
    hf_to_olmo2_path,
    params_to_hf_olmo2,
)

import reference as ref  # noqa: E402

SHAPES = [
    ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=160, vocab_size=97),
    ModelConfig(
        d_model=64, n_layers=3, n_heads=8, n_kv_heads=2, mlp_hidden=96, vocab_size=128, rope_theta=1e4
    ),
    ModelConfig(d_model=48, n_layers=1, n_heads=3, n_kv_heads=1, mlp_hidden=64, vocab_size=50, norm_eps=1e-5),
]


def hf_model(cfg: ModelConfig):
    config = transformers.Olmo2Config(**hf_olmo2_config(cfg, eos_token_id=0, pad_token_id=1))
    return transformers.Olmo2ForCausalLM(config).eval()


@pytest.mark.parametrize("cfg", SHAPES, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("seq", [1, 37])
def test_logits_equal_transformers(cfg, seq, gen):
    params = ref.perturbed_params(cfg, seed=7).apply(lambda t: t.float())
    model = hf_model(cfg)
    model.load_state_dict(params_to_hf_olmo2(params), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (3, seq), generator=gen)
    with torch.no_grad():
        expected = model(ids).logits
    out = logits(params, ids, cfg)
    assert (out - expected).abs().max().item() < 1e-4


def test_name_mapping_round_trips_every_tensor():
    cfg = SHAPES[1]
    model = hf_model(cfg)
    state = model.state_dict()
    params = hf_olmo2_to_params(state)
    assert set(flatten(params)) == set(flatten(ref.perturbed_params(cfg)))
    back = params_to_hf_olmo2(params)
    assert set(back) == set(state)
    assert all(back[k] is state[k] for k in state)


def test_unknown_hf_names_are_refused():
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.rotary"):
        hf_to_olmo2_path("model.layers.0.self_attn.rotary.inv_freq")
