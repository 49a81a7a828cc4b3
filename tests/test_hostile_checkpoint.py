"""Checkpoints and model directories made by an attacker, or damaged: loading never runs their code,
never opens a file outside them, never follows or deletes through links, and names every damaged file.

Every attack is first shown to be live (the same files through DCP's stock reader run the payload or
open the outside file), so a test here fails if the defence goes away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path

import orjson
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from olmo_fn.config import TrainConfig
from olmo_fn.errors import CheckpointError
from olmo_fn.graph.param_tree import flatten
from olmo_fn.run import main
from olmo_fn.state.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_incomplete,
)
from olmo_fn.state.checkpoint_writer import CheckpointConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_state import empty_train_state
from olmo_fn.train import train

from hostile import OpenedFiles, flip_bytes, plant_byte_entry, redirect_storage, reseal
from outcomes import one_error_line, snapshot

SMALL = TrainConfig(
    model=dataclasses.replace(
        TrainConfig().model, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=64
    ),
    steps=4,
    global_batch_size=2,
    schedule=ScheduleConfig(warmup_steps=1),
    checkpoint=CheckpointConfig(interval=2, keep_last=2),
)
SMALL = dataclasses.replace(SMALL, data=dataclasses.replace(SMALL.data, seq_len=32))
KEY = "params.blocks.0.attention.w_q"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    train(dataclasses.replace(SMALL, run_dir=str(run_dir)), progress=False)
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy


def stock_dcp_load(checkpoint: Path) -> None:
    """What DCP does without olmo_fn's reader (the attack's proof of life)."""
    template = flatten({"params": empty_train_state(SMALL.model, device="cpu").params.to_dict()})
    nested = {"params": {k.removeprefix("params."): v for k, v in template.items()}}
    dcp.load(nested, storage_reader=FileSystemReader(checkpoint), no_dist=True)


# ---- 1. code execution through DCP byte entries ------------------------------------------------------


def test_planted_byte_entry_runs_code_through_stock_dcp(run_copy, tmp_path):
    """Control: the payload is live — DCP's own reader executes it."""
    marker = tmp_path / "pwned"
    plant_byte_entry(run_copy / "checkpoints/step4", KEY, marker)
    with contextlib.suppress(Exception, CheckpointException):  # the payload runs first; then it fails
        stock_dcp_load(run_copy / "checkpoints/step4")
    assert marker.exists()


COMMANDS = {
    "train (resume)": lambda run, out: ["train", "--run-dir", str(run)],
    "generate": lambda run, out: [
        "generate",
        "--checkpoint",
        str(run),
        "--prompt",
        "def ",
        "--max-new-tokens",
        "2",
    ],
    "checkpoint info --verify": lambda run, out: ["checkpoint", "info", str(run), "--verify"],
    "checkpoint export": lambda run, out: ["checkpoint", "export", str(run), str(out)],
    "convert to-hf": lambda run, out: ["convert", "to-hf", str(run), str(out)],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_planted_byte_entry_never_runs(run_copy, tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    plant_byte_entry(run_copy / "checkpoints/step4", KEY, marker)
    before = snapshot(run_copy)
    assert main(COMMANDS[command](run_copy, tmp_path / "out")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "step4" in line and "BytesStorageMetadata" in line
    assert not marker.exists()
    assert snapshot(run_copy) == before
    assert not (tmp_path / "out").exists()


def test_plain_checkpoint_info_does_not_read_tensors(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    plant_byte_entry(run_copy / "checkpoints/step4", KEY, marker)
    assert main(["checkpoint", "info", str(run_copy)]) == 0
    assert "step4" in capsys.readouterr().out and not marker.exists()


def test_byte_entry_with_an_allowed_class_list_is_still_refused(run_copy, tmp_path, monkeypatch):
    """Even if the unpickler admitted byte entries, the metadata check refuses them by type."""
    import olmo_fn.state.dcp_reader as reader

    allowed = {k: set(v) for k, v in reader._METADATA_GLOBALS.items()}
    allowed["torch.distributed.checkpoint.metadata"].add("BytesStorageMetadata")
    monkeypatch.setattr(reader, "_METADATA_GLOBALS", allowed)
    marker = tmp_path / "pwned"
    plant_byte_entry(run_copy / "checkpoints/step4", KEY, marker)
    with pytest.raises(CheckpointError, match=rf"entry '{KEY}' is a BytesStorageMetadata, not a tensor"):
        load_checkpoint(run_copy / "checkpoints/step4", empty_train_state(SMALL.model, device="cpu"))
    assert not marker.exists()


# ---- 2. reads outside the checkpoint ----------------------------------------------------------------


def test_storage_path_outside_the_checkpoint_is_refused_before_opening(run_copy, tmp_path, capsys):
    checkpoint = run_copy / "checkpoints/step4"
    (shard,) = checkpoint.glob("*.distcp")
    outside = run_copy / "elsewhere.distcp"
    shutil.copyfile(shard, outside)  # a real tensor file: the stock reader would load it happily
    redirect_storage(checkpoint, "../../elsewhere.distcp")
    with OpenedFiles.get() as opened:
        stock_dcp_load(checkpoint)
    assert opened.touched(outside)  # control: DCP itself reads outside the checkpoint

    with OpenedFiles.get() as opened:
        assert main(["checkpoint", "export", str(run_copy), str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'../../elsewhere.distcp', outside" in line
    assert not opened.touched(outside)


def test_shard_linked_to_a_file_outside_is_refused(run_copy, tmp_path, capsys):
    checkpoint = run_copy / "checkpoints/step4"
    (shard,) = checkpoint.glob("*.distcp")
    outside = tmp_path / "outside.distcp"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with OpenedFiles.get() as opened:
        assert main(["generate", "--checkpoint", str(run_copy), "--prompt", "x"]) == 2
    assert "outside" in one_error_line(capsys.readouterr().err)
    assert not opened.touched(outside)


def test_hf_index_naming_a_file_outside_is_refused_before_opening(
    tmp_path, finished_run, capsys, monkeypatch
):
    import safetensors.torch

    hf = tmp_path / "hf"
    assert main(["convert", "to-hf", str(finished_run), str(hf)]) == 0
    capsys.readouterr()
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
    weight_map = {
        "model.embed_tokens.weight": "../secret.txt",
        "lm_head.weight": "model-00001-of-00001.safetensors",
    }
    (hf / "model.safetensors.index.json").write_bytes(orjson.dumps({"weight_map": weight_map}))
    loaded = []
    real_load = safetensors.torch.load_file
    monkeypatch.setattr(
        safetensors.torch, "load_file", lambda path, **kw: loaded.append(path) or real_load(path, **kw)
    )
    with OpenedFiles.get() as opened:
        assert main(["convert", "from-hf", str(hf), str(tmp_path / "imported")]) == 2
    assert "'../secret.txt', outside" in one_error_line(capsys.readouterr().err)
    assert loaded == [] and not opened.touched(secret)


def test_export_naming_a_tokenizer_outside_is_refused(tmp_path, finished_run, capsys):
    export = tmp_path / "export"
    assert main(["checkpoint", "export", str(finished_run), str(export)]) == 0
    capsys.readouterr()
    config = orjson.loads((export / "config.json").read_bytes())
    (tmp_path / "secret.json").write_text("{}")
    (export / "config.json").write_bytes(orjson.dumps({**config, "tokenizer": "../secret.json"}))
    assert main(["generate", "--checkpoint", str(export), "--prompt", "x"]) == 2
    assert "'../secret.json', outside" in one_error_line(capsys.readouterr().err)


# ---- 3. symbolic links in checkpoints/ -----------------------------------------------------------


def test_linked_newest_checkpoint_is_refused_and_nothing_changes(run_copy, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run_copy / "checkpoints/step4", elsewhere)
    (run_copy / "checkpoints/step4").symlink_to(elsewhere, target_is_directory=True)
    cfg = dataclasses.replace(SMALL, run_dir=str(run_copy), steps=6)
    before, outside_before = snapshot(run_copy), snapshot(elsewhere)
    assert main(["train", "--run-dir", str(run_copy), "--steps", "6", "--allow-config-change"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"checkpoints/step4 -> {elsewhere} is a symbolic link" in line
    assert snapshot(run_copy) == before and snapshot(elsewhere) == outside_before
    with pytest.raises(CheckpointError, match="symbolic link"):
        train(dataclasses.replace(cfg, allow_config_change=True), progress=False)
    # Read-only commands read it like any other checkpoint.
    assert main(["checkpoint", "info", str(run_copy), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out


def test_pruning_never_deletes_through_a_link_and_never_crashes(run_copy, tmp_path):
    elsewhere = tmp_path / "kept"
    shutil.copytree(run_copy / "checkpoints/step2", elsewhere)
    (run_copy / "checkpoints/step1").symlink_to(elsewhere, target_is_directory=True)
    deleted = prune_checkpoints(run_copy, keep_last=1, permanent_every=0)
    assert deleted == [run_copy / "checkpoints/step2"]
    assert (run_copy / "checkpoints/step1").is_symlink() and (elsewhere / "manifest.json").is_file()
    # A leftover `.stepN.deleting` that is a link: the link goes, never its target.
    (run_copy / "checkpoints/.step9.deleting").symlink_to(elsewhere, target_is_directory=True)
    assert run_copy / "checkpoints/.step9.deleting" in remove_incomplete(run_copy)
    assert (
        not os.path.lexists(run_copy / "checkpoints/.step9.deleting")
        and (elsewhere / "manifest.json").is_file()
    )


def test_pruning_reports_a_checkpoint_it_cannot_delete(run_copy, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))

    monkeypatch.setattr(os, "rename", refuse)
    assert prune_checkpoints(run_copy, keep_last=1, permanent_every=0) == []
    assert "could not delete old checkpoint" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(run_copy)] == [2, 4]


# ---- 4. silent corruption -------------------------------------------------------------------------


def test_flipped_bytes_are_named_on_load_and_by_verify(run_copy, capsys):
    checkpoint = run_copy / "checkpoints/step4"
    (shard,) = checkpoint.glob("*.distcp")
    assert main(["checkpoint", "info", str(run_copy), "--verify"]) == 0
    assert "verified: " in capsys.readouterr().out
    flip_bytes(shard, 64)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: checksum mismatch"):
        load_checkpoint(checkpoint, empty_train_state(SMALL.model, device="cpu"))
    assert main(["checkpoint", "info", str(run_copy), "--verify"]) == 2
    assert f"{shard}: checksum mismatch" in one_error_line(capsys.readouterr().err)
    before = snapshot(run_copy)
    assert main(["train", "--run-dir", str(run_copy), "--steps", "6", "--allow-config-change"]) == 2
    assert "checksum mismatch" in one_error_line(capsys.readouterr().err)
    assert snapshot(run_copy) == before


def test_a_file_that_holds_tensors_must_have_a_checksum(run_copy):
    checkpoint = run_copy / "checkpoints/step4"
    manifest = orjson.loads((checkpoint / "manifest.json").read_bytes())
    (shard,) = checkpoint.glob("*.distcp")
    del manifest["files"][shard.name]
    (checkpoint / "manifest.json").write_bytes(orjson.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=rf"{shard.name} hold\(s\) checkpoint data but have no recorded checksum"
    ):
        load_checkpoint(checkpoint, empty_train_state(SMALL.model, device="cpu"))


def test_checksums_are_recorded_for_every_file(finished_run):
    import hashlib

    checkpoint = finished_run / "checkpoints/step4"
    files = orjson.loads((checkpoint / "manifest.json").read_bytes())["files"]
    on_disk = {p.name for p in checkpoint.iterdir()} - {"manifest.json"}
    assert set(files) == on_disk and ".metadata" in files
    for name, entry in files.items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_async_save_records_the_same_checksums(finished_run, tmp_path):
    run_dir = tmp_path / "async"
    cfg = dataclasses.replace(
        SMALL, run_dir=str(run_dir), checkpoint=dataclasses.replace(SMALL.checkpoint, async_save=True)
    )
    train(cfg, progress=False)
    for step in (2, 4):
        sync = orjson.loads((finished_run / f"checkpoints/step{step}/manifest.json").read_bytes())["files"]
        async_ = orjson.loads((run_dir / f"checkpoints/step{step}/manifest.json").read_bytes())["files"]
        assert sync.keys() == async_.keys()
        shard = next(k for k in sync if k.endswith(".distcp"))
        assert sync[shard] == async_[shard]  # the same tensors, bit for bit


def test_resealed_checkpoint_still_loads(run_copy):
    """The helpers' reseal produces a valid manifest (so the refusals above come from the checks)."""
    reseal(run_copy / "checkpoints/step4")
    state = load_checkpoint(run_copy / "checkpoints/step4", empty_train_state(SMALL.model, device="cpu"))
    assert state.step == 4 and torch.isfinite(flatten(state.params)["blocks.0.attention.w_q"]).all()
