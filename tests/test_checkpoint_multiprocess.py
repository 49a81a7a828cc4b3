"""Checkpoints reshard: written by 2 gloo processes (sharded DTensors) and read by 1, and back."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from olmo_fn.graph.param_tree import flatten
from olmo_fn.state.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from olmo_fn.state.train_state import empty_train_state

import dist_workers as w

WORLD = 2


def spawn(fn, tmp_path, directory):
    errors = tmp_path / "errors"
    errors.mkdir()
    mp.spawn(fn, args=(WORLD, tmp_path / "store", directory, errors), nprocs=WORLD, join=True)
    failures = {p.name: p.read_text() for p in errors.iterdir()}
    assert not failures, failures


def test_saved_by_two_processes_loads_into_one(tmp_path):
    directory = tmp_path / "checkpoints" / "step17"
    spawn(w.save_sharded, tmp_path, directory)
    assert sorted(p.name for p in directory.parent.iterdir()) == ["step17"]  # no temporary left
    assert sorted(p.name for p in directory.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "manifest.json",
    ]
    assert read_manifest(directory)["step"] == 17
    loaded = load_checkpoint(directory, empty_train_state(w.CFG, device="cpu"))
    expected = w.full_state()
    for got_tree, want_tree in ((loaded.params, expected.params), (loaded.opt_state, expected.opt_state)):
        got, want = flatten(got_tree), flatten(want_tree)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)
    assert (loaded.step, loaded.data_cursor, loaded.tokens_seen, loaded.config) == (17, 68, 4352, {"k": 1})


def test_saved_by_one_process_loads_into_two(tmp_path):
    directory = tmp_path / "step17"
    save_checkpoint(directory, w.full_state())
    spawn(w.load_sharded, tmp_path, directory)


def test_ranks_verify_a_share_each_and_all_name_the_damage(tmp_path):
    """Rank 0 hashes .metadata and __1_0.distcp, rank 1 hashes __0_0.distcp; the damage rank 0 finds
    is raised on both."""
    directory = tmp_path / "checkpoints" / "step17"
    spawn(w.save_sharded, tmp_path, directory)
    shard = directory / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "errors").rmdir()
    (tmp_path / "store").unlink(missing_ok=True)
    spawn(w.load_damaged, tmp_path, directory)
