"""Hugging Face interop for OLMoE (``OlmoeForCausalLM``): logits and greedy generation equal
transformers' after import, for both values of norm_topk_prob; import then export is lossless and loads
with no missing or unexpected keys; `convert from-hf` / `to-hf` carry an OLMoE model both ways; what
OlmoeForCausalLM cannot compute is refused by name."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from olmo_fn.errors import CheckpointError  # noqa: E402
from olmo_fn.graph import ModelConfig, logits  # noqa: E402
from olmo_fn.graph.moe import route  # noqa: E402
from olmo_fn.graph.moe_config import MoeConfig  # noqa: E402
from olmo_fn.graph.param_tree import flatten  # noqa: E402
from olmo_fn.graph.sampling import generate  # noqa: E402
from olmo_fn.io.hf_checkpoint import read_hf_model, write_hf_model  # noqa: E402
from olmo_fn.io.hf_mapping import model_config_from_hf, params_from_hf  # noqa: E402

import reference as ref  # noqa: E402

VOCAB = 72


def random_olmoe(norm_topk_prob: bool = False, seed: int = 0, **overrides):
    """A tiny fp32 OlmoeForCausalLM: 2 layers, d_model 64, GQA, 4 experts of width 48, top 2. Norm
    weights are moved off 1 and matrices scaled up, so logits are O(1), routing is decisive and a
    swapped gate/up or a misplaced expert shows."""
    config = transformers.OlmoeConfig(
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        router_aux_loss_coef=0.02,
        attn_implementation="eager",
        eos_token_id=None,  # no early stop when generating: compare the whole run
        pad_token_id=None,
        bos_token_id=None,
        **overrides,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5 * torch.randn_like(param)) if param.ndim == 1 else param.mul_(5)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def loaded_cleanly(directory):
    """transformers' model of `directory`, asserting that every tensor was expected and none missing."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"], info
    return model.eval()


@pytest.fixture(params=[False, True], ids=["topk-raw", "topk-normalized"])
def saved_olmoe(request, tmp_path):
    model = random_olmoe(norm_topk_prob=request.param)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return model, tmp_path / "hf"


def test_save_pretrained_writes_one_tensor_per_expert(saved_olmoe):
    """The layout on disk (as on the Hub): per-expert gate/up/down, router as mlp.gate; in memory
    transformers 5.x fuses them (gate_up_proj, gate first), which import reads too."""
    model, directory = saved_olmoe
    keys = set(safetensors_torch.load_file(str(directory / "model.safetensors")))
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in keys
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.0.up_proj.weight"} <= keys
    assert not any("gate_up_proj" in k for k in keys)
    assert "model.layers.0.mlp.experts.gate_up_proj" in model.state_dict()
    _, from_disk, _ = read_hf_model(directory)
    from_memory = flatten(params_from_hf(model.state_dict(), "olmoe"))
    assert from_memory.keys() == flatten(from_disk).keys()
    assert all(torch.equal(t, from_memory[k]) for k, t in flatten(from_disk).items())


def test_imported_olmoe_logits_equal_transformers(saved_olmoe, gen):
    model, directory = saved_olmoe
    cfg, params, arch = read_hf_model(directory)
    assert arch == "olmoe" and cfg.block == "pre_norm" and cfg.qk_norm_scope == "all_heads"
    assert cfg.moe == MoeConfig(
        n_experts=4, top_k=2, hidden=48, normalize_top_k=model.config.norm_topk_prob, lb_loss=0.02
    )
    ids = torch.randint(0, VOCAB, (3, 31), generator=gen)
    theirs = hf_logits(model, ids)
    assert theirs.std().item() > 0.5  # not a near-zero model a wrong mapping could pass
    assert (logits(params, ids, cfg) - theirs).abs().max().item() < 1e-4
    # Every expert is used, each token by two different ones: the test sees every expert's weights.
    x = params["embeddings"][ids].reshape(-1, cfg.d_model)
    _, experts, _ = route(params["blocks"]["0"]["feed_forward"]["router"], x, cfg.moe)
    assert set(experts.flatten().tolist()) == set(range(4))


def test_olmoe_import_then_export_is_lossless(saved_olmoe, tmp_path, gen):
    model, directory = saved_olmoe
    cfg, params, _ = read_hf_model(directory)
    out = write_hf_model(tmp_path / "exported", params, cfg)
    original = safetensors_torch.load_file(str(directory / "model.safetensors"))
    exported = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    config = orjson.loads((out / "config.json").read_bytes())
    assert config["norm_topk_prob"] == model.config.norm_topk_prob and config["router_aux_loss_coef"] == 0.02
    ids = torch.randint(0, VOCAB, (2, 23), generator=gen)
    torch.testing.assert_close(hf_logits(loaded_cleanly(out), ids), hf_logits(model, ids))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_exported_olmo_fn_olmoe_runs_in_transformers(tied, tmp_path, gen):
    """Our parameters -> a Hugging Face directory -> from_pretrained: the same logits; read back, the
    same config and tensors."""
    cfg = ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=24,
        vocab_size=40,
        block="pre_norm",
        norm_eps=1e-5,
        rope_theta=1e4,
        tie_embeddings=tied,
        moe=MoeConfig(n_experts=4, top_k=2, hidden=24, normalize_top_k=True),
    )
    params = ref.perturbed_params(cfg, seed=4).apply(lambda t: (t if t.ndim == 1 else 5 * t).float())
    out = write_hf_model(tmp_path / "hf", params, cfg, extra_config={"eos_token_id": 0})
    model = loaded_cleanly(out)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=gen)
    ours = logits(params, ids, cfg)
    assert ours.std().item() > 0.5
    assert (ours - hf_logits(model, ids)).abs().max().item() < 1e-4
    back_cfg, back, _ = read_hf_model(out)
    assert back_cfg == cfg
    assert all(torch.equal(t, flatten(back)[k]) for k, t in flatten(params).items())


def test_greedy_olmoe_equals_transformers_generate(tmp_path, gen):
    from olmo_fn.io.model_source import load_model

    model = random_olmoe(seed=1)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    loaded = load_model(tmp_path / "hf")
    assert loaded.source == "huggingface" and loaded.cfg.moe.enabled
    ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16
        )
    got = generate(loaded.params, loaded.cfg, ids.tolist(), max_new_tokens=16, eos_token_id=None)
    assert got == expected[:, 6:].tolist()
    assert all(len(set(row)) >= 3 for row in got)


def test_convert_from_hf_then_to_hf_carries_olmoe(tmp_path, gen):
    """`convert from-hf` of an OLMoE directory computes transformers' logits; `convert to-hf` of the
    result writes the very tensors it was read from."""
    from olmo_fn.io.model_source import load_model
    from olmo_fn.run import main

    model = random_olmoe(norm_topk_prob=True, seed=2)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours")
    assert ours.source == "export" and ours.cfg.moe.n_experts == 4 and ours.cfg.moe.normalize_top_k
    ids = torch.randint(0, VOCAB, (2, 27), generator=gen)
    assert (logits(ours.params, ids, ours.cfg) - hf_logits(model, ids)).abs().max().item() < 1e-4
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "again")]) == 0
    original = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    again = safetensors_torch.load_file(str(tmp_path / "again" / "model.safetensors"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    assert (hf_logits(loaded_cleanly(tmp_path / "again"), ids) - hf_logits(model, ids)).abs().max() < 1e-5


BASE = ModelConfig(
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    mlp_hidden=24,
    vocab_size=40,
    block="pre_norm",
    moe=MoeConfig(n_experts=4, top_k=2, hidden=24),
)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"moe": dataclasses.replace(BASE.moe, shared_hidden=16)}, "model.moe.shared_hidden=16"),
        ({"moe": dataclasses.replace(BASE.moe, score="sigmoid")}, "model.moe.score='sigmoid'"),
        ({"moe": dataclasses.replace(BASE.moe, capacity_factor=1.25)}, "model.moe.capacity_factor=1.25"),
        ({"moe": dataclasses.replace(BASE.moe, bias_rate=0.01)}, "model.moe.bias_rate=0.01"),
        ({"moe": dataclasses.replace(BASE.moe, every=2)}, "model.moe.every=2"),
        ({"qk_norm_scope": "per_head"}, "model.qk_norm_scope='per_head'"),
        ({"block": "reordered_norm"}, "model.block='reordered_norm'"),
    ],
)
def test_unrepresentable_moe_is_refused_by_name(change, needle, tmp_path):
    cfg = dataclasses.replace(BASE, **change)
    params = ref.perturbed_params(cfg).apply(lambda t: t.float())
    with pytest.raises(CheckpointError, match="no Hugging Face equivalent") as err:
        write_hf_model(tmp_path / "hf", params, cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_unsupported_olmoe_checkpoints_are_refused_by_name(tmp_path):
    model = random_olmoe()
    base = orjson.loads(model.config.to_json_string())
    for change, needle in [
        ({"clip_qkv": 8.0}, "clip_qkv=8.0 is not supported"),
        ({"num_experts_per_tok": 5}, "model.moe.top_k=5 exceeds model.moe.n_experts=4"),
        ({"num_experts": 0}, "num_experts=0 must be a positive integer"),
    ]:
        with pytest.raises(CheckpointError, match=needle):
            model_config_from_hf({**base, **change}, where="x/config.json")
    missing = {k: v for k, v in base.items() if k != "num_experts"}
    with pytest.raises(CheckpointError, match="missing num_experts"):
        model_config_from_hf(missing, where="x/config.json")
    state = {k: v for k, v in model.state_dict().items() if "experts" not in k}
    for j in (0, 1, 3):  # expert 2 left out
        state |= {
            f"model.layers.0.mlp.experts.{j}.{w}_proj.weight": torch.zeros(1) for w in ("gate", "up", "down")
        }
    with pytest.raises(CheckpointError, match=r"experts\.2\.gate_proj\.weight' is missing \(experts \[2\]"):
        params_from_hf(state, "olmoe")


def test_hub_olmoe_config_reads_as_the_preset():
    """The config.json of allenai/OLMoE-1B-7B-0924 (written by transformers 4.x: top-level rope_theta,
    rope_scaling null) is the olmoe-1b-7b preset, and the preset's config reads back as itself."""
    from olmo_fn.graph.presets import PRESETS
    from olmo_fn.io.hf_mapping import hf_config

    hub = {
        "architectures": ["OlmoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "eos_token_id": 50279,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 1024,
        "max_position_embeddings": 4096,
        "model_type": "olmoe",
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 16,
        "num_key_value_heads": 16,
        "output_router_logits": False,
        "pad_token_id": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 50304,
    }
    preset = PRESETS["olmoe-1b-7b"]
    assert model_config_from_hf(hub) == (preset, "olmoe")
    assert model_config_from_hf(hf_config(preset)) == (preset, "olmoe")


def test_convert_to_hf_refuses_an_olmo2_style_moe_by_name(tmp_path, capsys):
    """olmoe-tiny's reordered-norm block has no OlmoeForCausalLM equivalent: one line says so."""
    from olmo_fn.graph.presets import PRESETS
    from olmo_fn.io.safetensors_export import export_model
    from olmo_fn.run import main

    cfg = dataclasses.replace(PRESETS["olmoe-tiny"], n_layers=1)
    export_model(tmp_path / "ours", ref.perturbed_params(cfg).apply(lambda t: t.float()), cfg)
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.block='reordered_norm'" in err and "OlmoeForCausalLM" in err and "\n" not in err
    assert not (tmp_path / "hf").exists()
