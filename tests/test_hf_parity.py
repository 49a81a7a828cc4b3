"""Hugging Face interop: logits equal transformers' for Olmo2, Olmo3 (sliding windows), Llama (with
Llama 3, YaRN and linear RoPE scaling, and a GeGLU MLP) and Qwen3 (per-head QK-norm); import then
export is lossless; what cannot be computed exactly is refused by name."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from olmo_fn.errors import CheckpointError  # noqa: E402
from olmo_fn.graph import ModelConfig, logits  # noqa: E402
from olmo_fn.graph.param_tree import flatten  # noqa: E402
from olmo_fn.io.hf_checkpoint import read_hf_model, write_hf_model  # noqa: E402
from olmo_fn.io.hf_mapping import from_hf_name, model_config_from_hf  # noqa: E402

import reference as ref  # noqa: E402

COMMON = {"attn_implementation": "eager", "eos_token_id": 0, "pad_token_id": 1, "bos_token_id": None}
HF_MODELS = {
    "olmo2-mha": (
        transformers.Olmo2Config,
        dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=97,
        ),
    ),
    "olmo2-gqa": (
        transformers.Olmo2Config,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=128,
            rope_theta=1e4,
            rms_norm_eps=1e-6,
        ),
    ),
    "olmo3-window": (
        transformers.Olmo3Config,
        dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=5,
            num_attention_heads=3,
            num_key_value_heads=1,
            vocab_size=50,
            sliding_window=6,
        ),
    ),
    "llama-gqa": (
        transformers.LlamaConfig,
        dict(
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=90,
            rope_theta=5e5,
            rms_norm_eps=1e-5,
        ),
    ),
    "llama-rope-llama3": (
        transformers.LlamaConfig,
        dict(
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=70,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama-rope-yarn-geglu": (
        transformers.LlamaConfig,
        dict(
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=70,
            hidden_act="gelu_pytorch_tanh",
            max_position_embeddings=128,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1e4,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
            },
        ),
    ),
    "llama-rope-linear-gelu": (
        transformers.LlamaConfig,
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=60,
            hidden_act="gelu",
            rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 3.0},
        ),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=80,
            rms_norm_eps=1e-6,
        ),
    ),
    "llama-tied": (
        transformers.LlamaConfig,
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=60,
            tie_word_embeddings=True,
        ),
    ),
}


def random_hf_model(name: str, seed: int = 0):
    config_cls, kwargs = HF_MODELS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs, **COMMON)).eval()
    with torch.no_grad():  # move norm weights off 1 so a misplaced norm shows
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.5 * torch.randn_like(param))
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(params=list(HF_MODELS))
def saved_hf(request, tmp_path):
    model = random_hf_model(request.param)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return request.param, model, tmp_path / "hf"


@pytest.mark.parametrize("seq", [1, 37])
def test_imported_logits_equal_transformers(saved_hf, seq, gen):
    name, model, directory = saved_hf
    cfg, params, arch = read_hf_model(directory)
    assert arch == name.split("-")[0]
    if name == "olmo3-window":
        assert cfg.layer_windows == (6, 6, 6, 0, 6)
    ids = torch.randint(0, cfg.vocab_size, (3, seq), generator=gen)
    assert (logits(params, ids, cfg) - hf_logits(model, ids)).abs().max().item() < 1e-4


def test_import_then_export_is_lossless(saved_hf, tmp_path, gen):
    name, model, directory = saved_hf
    cfg, params, _ = read_hf_model(directory)
    out = write_hf_model(tmp_path / "exported", params, cfg)
    original = safetensors_torch.load_file(str(directory / "model.safetensors"))
    exported = safetensors_torch.load_file(str(out / "model.safetensors"))
    if name == "llama-tied":  # tied on both sides: one matrix, no lm_head.weight
        assert cfg.tie_embeddings and "w_out" not in params["lm_head"]
        assert (
            "lm_head.weight" not in exported
            and orjson.loads((out / "config.json").read_bytes())["tie_word_embeddings"]
        )
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=gen)
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(model, ids))


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48, vocab_size=40),
        ModelConfig(
            d_model=32,
            n_layers=4,
            n_heads=2,
            n_kv_heads=2,
            mlp_hidden=48,
            vocab_size=40,
            window_pattern=(5, 5, 5, 0),
        ),
        ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=1,
            mlp_hidden=48,
            vocab_size=40,
            qk_norm=False,
            block="pre_norm",
        ),
    ],
    ids=["olmo2", "olmo3", "llama"],
)
def test_exported_olmo_fn_model_runs_in_transformers(cfg, tmp_path, gen):
    params = ref.perturbed_params(cfg, seed=4).apply(lambda t: t.float())
    out = write_hf_model(tmp_path / "hf", params, cfg, extra_config={"eos_token_id": 0})
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=gen)
    assert (logits(params, ids, cfg) - hf_logits(model, ids)).abs().max().item() < 1e-4
    back = read_hf_model(out)[0]  # a window pattern comes back in its shortest equivalent form
    assert back.layer_windows == cfg.layer_windows
    assert (
        dataclasses.replace(back, window_pattern=cfg.window_pattern, full_last_layer=cfg.full_last_layer)
        == cfg
    )


def test_unsupported_features_are_refused_by_name(tmp_path):
    base = orjson.loads(random_hf_model("llama-gqa").config.to_json_string())
    for change, needle in [
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
            "needs original_max",
        ),
        (
            {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0}},
            "rope_type='dynamic'",
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 2.0,
                    "mscale": 0.7,
                    "original_max_position_embeddings": 8,
                }
            },
            "with mscale",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({"rope_parameters": {"rope_type": "linear", "factor": -1.0}}, "factor=-1.0"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ]:
        with pytest.raises(CheckpointError, match=needle):
            model_config_from_hf({**base, **change}, where="x/config.json")
    (tmp_path / "config.json").write_bytes(orjson.dumps(base))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="reads safetensors only"):
        read_hf_model(tmp_path)
    with pytest.raises(CheckpointError, match="rotary"):
        from_hf_name("model.layers.0.self_attn.rotary.weight", "olmo2")


def test_sharded_checkpoints_are_read(tmp_path, gen):
    model = random_hf_model("olmo2-gqa")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    cfg, params, _ = read_hf_model(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=gen)
    assert (logits(params, ids, cfg) - hf_logits(model, ids)).abs().max().item() < 1e-4
    assert dataclasses.asdict(cfg)["n_kv_heads"] == 2 and len(flatten(params)) > 0


@pytest.mark.parametrize("name", ["llama-rope-yarn-geglu", "qwen3"])
def test_convert_from_hf_then_train_and_export_again(name, tmp_path, gen):
    """A RoPE-scaled GeGLU Llama and a Qwen3 go through `convert from-hf` and back out with
    `convert to-hf`, computing transformers' logits at both ends."""
    from olmo_fn.io.model_source import load_model
    from olmo_fn.run import main

    model = random_hf_model(name)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours")
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=gen)
    assert (logits(ours.params, ids, ours.cfg) - hf_logits(model, ids)).abs().max().item() < 1e-4
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "again")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="eager")
    assert (hf_logits(again.eval(), ids) - hf_logits(model, ids)).abs().max().item() < 1e-5
