"""Checkpoints: DCP round trip, atomic directories, clear refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from olmo_fn.errors import CheckpointError
from olmo_fn.graph import ModelConfig
from olmo_fn.graph.param_tree import flatten
from olmo_fn.state.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from olmo_fn.state.train_state import init_train_state

CFG = ModelConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=24, vocab_size=30)


def saved_state(gen):
    state = init_train_state(CFG, seed=0, device="cpu", config_fingerprint="abc")
    with torch.no_grad():
        for t in flatten(state.opt_state).values():
            t.copy_(torch.rand(t.shape, generator=gen))
    return dataclasses.replace(state, step=7, data_cursor=112, tokens_seen=9999)


def test_round_trip_restores_everything(tmp_path, gen):
    state = saved_state(gen)
    state = dataclasses.replace(state, config={"note": "cfg"})
    save_checkpoint(tmp_path / "step7", state)
    fresh = init_train_state(CFG, seed=1, device="cpu")
    loaded = load_checkpoint(tmp_path / "step7", fresh)
    assert (loaded.step, loaded.data_cursor, loaded.tokens_seen, loaded.config_fingerprint) == (
        7,
        112,
        9999,
        "abc",
    )
    for tree_a, tree_b in ((state.params, loaded.params), (state.opt_state, loaded.opt_state)):
        a, b = flatten(tree_a), flatten(tree_b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = read_manifest(tmp_path / "step7")
    assert manifest["config"] == {"note": "cfg"}
    assert manifest["n_tensors"] == 3 * len(flatten(state.params))
    assert manifest["tensor_bytes"] == 3 * 4 * sum(t.numel() for t in flatten(state.params).values())


def test_save_leaves_no_temporary_directory_and_refuses_overwrite(tmp_path, gen):
    state = saved_state(gen)
    save_checkpoint(tmp_path / "step7", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step7"]
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "step7").iterdir())
    with pytest.raises(CheckpointError, match="step7"):
        save_checkpoint(tmp_path / "step7", state)
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "step7").iterdir()) == before


def test_manifest_problems_are_named(tmp_path, gen):
    save_checkpoint(tmp_path / "step7", saved_state(gen))
    manifest = tmp_path / "step7" / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json: manifest is not valid JSON"):
        read_manifest(tmp_path / "step7")
    manifest.unlink()
    with pytest.raises(CheckpointError, match="no checkpoint manifest"):
        load_checkpoint(tmp_path / "step7", init_train_state(CFG, seed=0, device="cpu"))


def test_loading_into_another_model_shape_is_refused(tmp_path, gen):
    save_checkpoint(tmp_path / "step7", saved_state(gen))
    other = init_train_state(dataclasses.replace(CFG, d_model=32), seed=0, device="cpu")
    with pytest.raises(
        CheckpointError, match=r"step7: .*params.blocks.0.attention.w_k saved \(16, 16\) vs model \(32, 32\)"
    ):
        load_checkpoint(tmp_path / "step7", other)


def test_damaged_tensor_files_are_named(tmp_path, gen):
    save_checkpoint(tmp_path / "step7", saved_state(gen))
    (shard,) = (tmp_path / "step7").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: 100 bytes, but .* were written \(truncated"):
        load_checkpoint(tmp_path / "step7", init_train_state(CFG, seed=0, device="cpu"))
