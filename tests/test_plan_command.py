"""`plan`: the placement table and bytes per rank, printed without starting a process; the bytes match
what DTensor placements really hold (a 64-rank fake process group); bad degrees are one line each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from olmo_fn.graph import get_preset
from olmo_fn.graph.flops import count_params
from olmo_fn.run import main

from outcomes import one_error_line

HERE = Path(__file__).parent


def test_seven_b_on_64_ranks_holds_what_plan_prints(capsys):
    argv = [
        "plan",
        "--preset",
        "olmo2-7b",
        "--world-size",
        "64",
        "--parallel.dp-shard",
        "8",
        "--parallel.tp",
        "8",
    ]
    assert main([*argv, "--json"]) == 0
    printed = orjson.loads(capsys.readouterr().out)["bytes_per_rank"]
    done = subprocess.run(
        [sys.executable, str(HERE / "fake_world.py"), "olmo2-7b", "64", "1", "8", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    held = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert held == {"parameters": printed["parameters"], "optimizer_moments": printed["optimizer_moments"]}
    total = 4 * count_params(get_preset("olmo2-7b"))
    assert total / 64 <= held["parameters"] <= total / 64 * 1.01  # an even split, up to padding
    assert held["optimizer_moments"] == 2 * held["parameters"]


def test_plan_prints_the_table_and_the_bytes(capsys):
    assert main(["plan", "--preset", "olmo2-1b", "--world-size", "8", "--parallel.tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "olmo2-1b on 8 processes (dp_replicate 1 x dp_shard 4 x tp 2)" in out
    rows = {" ".join(line.split()) for line in out.splitlines()}
    assert "*.attention.w_out replicate shard(0) shard(1) 18" in rows  # row-wise: TP splits the input dim
    for row in ("parameters (fp32)", "AdamW moments", "one block gathered", "activations", "total"):
        assert row in out


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--world-size", "4", "--parallel.tp", "3"], "parallel.dp_replicate=1 x parallel.tp=3 = 3 does not divide the world size 4"),
        (["--world-size", "4", "--parallel.dp-shard", "3"], "= 3, but the world size is 4"),
        (["--world-size", "8", "--parallel.tp", "8"], "parallel.tp=8 does not divide model.n_heads=4"),
        (["--world-size", "4", "--parallel.tp", "2", "--model.vocab-size", "385"], "parallel.tp=2 does not divide model.vocab_size=385"),
        (["--world-size", "3", "--global-batch-size", "16"], "data-parallel degree 3 (dp_replicate x dp_shard) does not divide global_batch_size=16"),
        (["--world-size", "2", "--parallel.tp", "2", "--data.seq-len", "255"], "parallel.tp=2 does not divide data.seq_len=255"),
    ],
)  # fmt: skip
def test_bad_degrees_are_one_line(capsys, flags, expected):
    assert main(["plan", "--preset", "olmo2-tiny", *flags]) == 2
    assert expected in one_error_line(capsys.readouterr().err)


def test_train_names_bad_degrees_before_any_process_group_starts(monkeypatch, capsys, tmp_path):
    """Under a launcher's environment, train refuses before it joins the group (no store is reachable
    here: joining would hang until a timeout)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "203.0.113.1")  # unreachable: joining would not return quickly
    monkeypatch.setenv("MASTER_PORT", "9")
    assert (
        main(["train", "--parallel.tp", "2", "--model.n-kv-heads", "1", "--run-dir", str(tmp_path / "r")])
        == 2
    )
    assert "parallel.tp=2 does not divide model.n_kv_heads=1" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()
