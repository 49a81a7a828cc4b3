"""`checkpoint info` and `checkpoint export`, through the command line's `main`."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
import torch

from olmo_fn.config import TrainConfig
from olmo_fn.errors import CheckpointError
from olmo_fn.graph import logits
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.safetensors_export import load_exported
from olmo_fn.run import main
from olmo_fn.state.checkpoint import load_params, read_manifest
from olmo_fn.state.checkpoint_writer import CheckpointConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_state import empty_train_state
from olmo_fn.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = TrainConfig(
        steps=4,
        schedule=ScheduleConfig(warmup_steps=1),
        global_batch_size=2,
        checkpoint=CheckpointConfig(interval=2),
    )
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=32))
    return train(
        dataclasses.replace(cfg, run_dir=str(tmp_path_factory.mktemp("ckcli") / "run")), progress=False
    )


def test_info_of_a_run_shows_its_newest_checkpoint(run_dir, capsys):
    assert main(["checkpoint", "info", str(run_dir)]) == 0
    text = capsys.readouterr().out
    manifest = read_manifest(run_dir / "checkpoints/step4")
    assert "step4" in text and "4 of 4" in text
    assert f"{manifest['tokens_seen']:,}" in text and str(manifest["n_tensors"]) in text
    assert "in this run  step2, step4" in text


def test_info_as_json_is_the_manifest(run_dir, capsys):
    assert main(["checkpoint", "info", str(run_dir / "checkpoints/step2"), "--json"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    manifest = read_manifest(run_dir / "checkpoints/step2")
    assert {k: shown[k] for k in manifest} == manifest
    assert shown["disk_bytes"] > manifest["tensor_bytes"] // 3  # params + two moments, all on disk


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trips_the_parameters(run_dir, tmp_path, capsys, dtype):
    out = tmp_path / "model"
    assert main(["checkpoint", "export", str(run_dir), str(out), "--dtype", dtype]) == 0
    model, params = load_exported(out)
    cfg = TrainConfig().model
    assert model == cfg
    saved = load_params(run_dir / "checkpoints/step4", empty_train_state(cfg, device="cpu").params)
    a, b = flatten(saved), flatten(params)
    assert a.keys() == b.keys()
    assert all(
        b[k].dtype == getattr(torch, dtype) and torch.equal(b[k], a[k].detach().to(b[k].dtype)) for k in a
    )
    ids = torch.randint(0, 256, (1, 16))
    if dtype == "float32":
        torch.testing.assert_close(logits(params, ids, model), logits(saved, ids, cfg))


def test_export_refuses_a_non_empty_directory(run_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["checkpoint", "export", str(run_dir), str(tmp_path)]) == 2
    assert "not empty; refusing to overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_info_of_missing_or_empty_paths_is_named(tmp_path, capsys):
    assert main(["checkpoint", "info", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        main(["checkpoint", "info", str(tmp_path / "run"), "--debug"])
