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


def fake_world_bytes(*args: str) -> dict:
    """What rank 0 of a fake process group holds (tests/fake_world.py ARGS)."""
    done = subprocess.run(
        [sys.executable, str(HERE / "fake_world.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout.strip().splitlines()[-1])


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
    held = fake_world_bytes("olmo2-7b", "64", "1", "8", "8")
    assert held == {"parameters": printed["parameters"], "optimizer_moments": printed["optimizer_moments"]}
    total = 4 * count_params(get_preset("olmo2-7b"))
    assert total / 64 <= held["parameters"] <= total / 64 * 1.01  # an even split, up to padding
    assert held["optimizer_moments"] == 2 * held["parameters"]


def test_olmo3_7b_at_64k_tokens_on_cp_8_x_fsdp_8_holds_what_plan_prints(capsys):
    """The issue's long-context layout: parameters sharded over dp_shard x cp = 64 ranks."""
    argv = ["plan", "--preset", "olmo3-7b", "--data.seq-len", "65536", "--world-size", "64"]
    argv += ["--parallel.cp", "8", "--parallel.dp-shard", "8", "--global-batch-size", "8"]
    assert main([*argv, "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["mesh"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 8, "cp": 8, "tp": 1}
    printed = report["bytes_per_rank"]
    held = fake_world_bytes("olmo3-7b", "64", "1", "8", "1", "8", "1")
    assert held == {"parameters": printed["parameters"], "optimizer_moments": printed["optimizer_moments"]}
    total = 4 * count_params(get_preset("olmo3-7b"))
    assert total / 64 <= held["parameters"] <= total / 64 * 1.01
    # One rank's slice is 8,192 tokens: its activations are an eighth of a 64k sequence's, plus the
    # keys and values gathered from the other slices.
    assert 0 < printed["activations_in_flight"] < 2**40


def test_pipeline_plan_shows_the_stages_and_holds_what_it_prints(capsys):
    """PP 2 x FSDP 2 of a 7-layer model: uneven stages (4 + 3 layers), and rank 0 holds what plan says."""
    argv = ["plan", "--preset", "olmo2-1b", "--model.n-layers", "7", "--world-size", "4"]
    argv += ["--parallel.pp", "2", "--micro-batch-size", "1", "--global-batch-size", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "stage 0 on pp rank 0: layers 0-3 + embedding" in out
    assert "stage 1 on pp rank 1: layers 4-6 + LM head and loss" in out
    assert main([*argv, "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    held = fake_world_bytes("olmo2-1b", "4", "1", "2", "1", "1", "2", "--model.n-layers", "7")
    # Rank 0 (stage 0) holds less than the busiest stage (stage 1 has the 100k-row LM head).
    assert held["parameters"] <= report["bytes_per_rank"]["parameters"]


def test_plan_prints_the_table_and_the_bytes(capsys):
    assert main(["plan", "--preset", "olmo2-1b", "--world-size", "8", "--parallel.tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "olmo2-1b on 8 processes (pp 1 x dp_replicate 1 x dp_shard 4 x cp 1 x tp 2)" in out
    rows = {" ".join(line.split()) for line in out.splitlines()}
    assert "*.attention.w_out replicate shard(0) shard(1) 18" in rows  # row-wise: TP splits the input dim
    for row in ("parameters (fp32)", "AdamW moments", "one block gathered", "activations", "total"):
        assert row in out


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--world-size", "4", "--parallel.tp", "3"], "parallel.pp=1 x dp_replicate=1 x cp=1 x tp=3 = 3 does not divide the world size 4"),
        (["--world-size", "4", "--parallel.dp-shard", "3"], "= 3, but the world size is 4"),
        (["--world-size", "8", "--parallel.tp", "8"], "parallel.tp=8 does not divide model.n_heads=4"),
        (["--world-size", "4", "--parallel.tp", "2", "--model.vocab-size", "385"], "parallel.tp=2 does not divide model.vocab_size=385"),
        (["--world-size", "3", "--global-batch-size", "16"], "data-parallel degree 3 (dp_replicate x dp_shard) does not divide global_batch_size=16"),
        (["--world-size", "2", "--parallel.tp", "2", "--data.seq-len", "255"], "parallel.tp=2 does not divide data.seq_len=255"),
        (["--world-size", "2", "--parallel.cp", "2", "--data.seq-len", "250"], "data.seq_len=250 is not divisible by 2 x parallel.cp = 4"),
        (["--world-size", "8", "--parallel.cp", "2", "--parallel.tp", "4", "--data.seq-len", "260"], "parallel.tp=4 does not divide each context-parallel slice of 130 tokens"),
        (["--world-size", "8", "--parallel.pp", "8"], "8 pipeline stages (parallel.pp=8 x 1 per rank) need at least as many layers, but model.n_layers=4"),
        (["--world-size", "2", "--parallel.pp", "2", "--parallel.pp-schedule", "zbv", "--parallel.pp-stages-per-rank", "3"], "parallel.pp_schedule=zbv runs exactly 2 stages per rank, not 3"),
        (["--world-size", "2", "--parallel.pp", "2", "--parallel.pp-schedule", "gpipe-2"], "parallel.pp_schedule='gpipe-2' is not a schedule; choose one of gpipe, 1f1b"),
        (["--world-size", "2", "--parallel.pp", "2", "--global-batch-size", "2", "--micro-batch-size", "2"], "parallel.pp_schedule=1f1b on pp=2 ranks needs at least pp=2 micro-batches, but each data-parallel rank gets 1 micro-batch(es) per step"),
        (["--world-size", "4", "--parallel.pp", "2", "--global-batch-size", "10", "--micro-batch-size", "1", "--parallel.pp-schedule", "interleaved-1f1b"], "needs a micro-batch count divisible by its rounds (count // pp = 2)"),
        (["--world-size", "2", "--parallel.pp", "2", "--model.tie-embeddings"], "with model.tie_embeddings is not supported"),
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
