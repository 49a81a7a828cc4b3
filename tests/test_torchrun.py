"""The real command line under torchrun on CPU (gloo): several processes train what one process trains,
a killed rank stops the run and the same command resumes it exactly, and the checkpoint of a
multi-process run exports like any other.

Each run is a few processes on two cores (tens of seconds): these tests are few and share runs.
Values: the float64 property suite (tests/property) is the exact proof; here fp32 sums in another
order may differ, so the first loss must agree within 1e-6 relative and 20 steps within 1 %.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch

from olmo_fn.graph import get_preset
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.io.safetensors_export import load_exported
from olmo_fn.state.checkpoint import load_params, read_manifest
from olmo_fn.state.train_state import empty_train_state

HERE = Path(__file__).parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 20
ARGS = (
    f"--steps {STEPS} --schedule.warmup-steps 5 --checkpoint.interval 10 --eval.interval 0 "
    "--global-batch-size 8 --data.seq-len 128 --threads 1"
).split()


def launch(cache: Path, *args: str, procs: int = 0, env: dict | None = None, script: list[str] | None = None):
    """``torchrun --nproc-per-node procs -m olmo_fn.run ARGS`` (procs 0: plain python, no launcher)."""
    program = script or ["-m", "olmo_fn.run"]
    head = [TORCHRUN, "--nproc-per-node", str(procs)] if procs else [sys.executable]
    full_env = {**os.environ, "OLMO_FN_CACHE": str(cache), **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run([*head, *program, *args], env=full_env, capture_output=True, text=True, timeout=600)


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, isolated_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    done = launch(isolated_cache, "train", *ARGS, "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.fixture(scope="module")
def fsdp_tp_run(tmp_path_factory, isolated_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp_tp") / "run"
    done = launch(isolated_cache, "train", *ARGS, "--parallel.tp", "2", "--run-dir", str(run_dir), procs=4)
    assert done.returncode == 0, done.stderr
    return run_dir


def assert_follows(run_dir: Path, reference: Path) -> None:
    got, want = losses(run_dir), losses(reference)
    assert len(got) == len(want) == STEPS
    assert abs(got[0] - want[0]) <= 1e-6 * want[0]
    worst = max(abs(a - b) / b for a, b in zip(got, want, strict=True))
    assert worst < 0.01, worst


@pytest.mark.parametrize(
    "flags",
    [
        ["--parallel.dp-shard", "4"],
        ["--parallel.dp-replicate", "2"],
        ["--parallel.cp", "2"],
        ["--parallel.pp", "2", "--micro-batch", "2"],
    ],
    ids=["FSDP 4", "HSDP 2x2", "CP 2 x FSDP 2", "PP 2 x FSDP 2"],
)
def test_four_processes_follow_one(one_process, tmp_path, isolated_cache, flags):
    run_dir = tmp_path / "run"
    done = launch(isolated_cache, "train", *ARGS, *flags, "--run-dir", str(run_dir), procs=4)
    assert done.returncode == 0, done.stderr
    assert_follows(run_dir, one_process)
    assert "4 processes" in done.stderr and done.stderr.count("run directory:") == 1  # rank 0 reports


def test_fsdp_times_tp_follows_one(one_process, fsdp_tp_run):
    assert_follows(fsdp_tp_run, one_process)
    assert sorted(p.name for p in (fsdp_tp_run / f"checkpoints/step{STEPS}").glob("*.distcp")) == [
        f"__{r}_0.distcp" for r in range(4)
    ]


def test_a_four_process_checkpoint_exports_and_resumes_anywhere(
    fsdp_tp_run, one_process, tmp_path, isolated_cache
):
    """Exports of the 4-process run have the files of a 1-process run's, holding what one process
    loads from the checkpoint; the run then continues on 2 processes (FSDP 2)."""
    outs = {}
    for name, run in (("four", fsdp_tp_run), ("one", one_process)):
        for command in (["checkpoint", "export"], ["convert", "to-hf"]):
            out = tmp_path / f"{name}-{command[0]}"
            done = launch(isolated_cache, *command, str(run), str(out))
            assert done.returncode == 0, done.stderr
            outs[(name, command[0])] = out
    for kind in ("checkpoint", "convert"):
        four, one = outs[("four", kind)], outs[("one", kind)]
        assert sorted(p.name for p in four.iterdir()) == sorted(p.name for p in one.iterdir())
    template = empty_train_state(get_preset("olmo2-tiny"), device="cpu").params
    loaded = flatten(load_params(fsdp_tp_run / f"checkpoints/step{STEPS}", template))
    _, exported = load_exported(outs[("four", "checkpoint")])
    assert all(torch.equal(flatten(exported)[k], loaded[k].detach()) for k in loaded)

    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp_tp_run, resumed)
    config = orjson.loads((resumed / "config.json").read_bytes())
    (resumed / "config.json").write_bytes(orjson.dumps({**config, "run_dir": str(resumed)}))
    done = launch(
        isolated_cache,
        "train",
        "--run-dir",
        str(resumed),
        "--steps",
        str(STEPS + 2),
        "--allow-config-change",
        "--parallel.tp",
        "1",
        procs=2,
    )
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and "dp_shard 2" in done.stderr
    assert read_manifest(resumed / f"checkpoints/step{STEPS + 2}")["step"] == STEPS + 2


def test_a_killed_rank_stops_the_run_and_the_same_command_resumes_exactly(tmp_path, isolated_cache):
    args = ["train", *ARGS[:-2], "--steps", "8", "--checkpoint.interval", "2", "--threads", "1"]
    reference = tmp_path / "uninterrupted"
    done = launch(isolated_cache, *args, "--run-dir", str(reference), procs=2)
    assert done.returncode == 0, done.stderr

    run_dir = tmp_path / "run"
    crash = [str(HERE / "crash_train.py"), "after-step", "3", "--"]
    started = time.monotonic()
    killed = launch(
        isolated_cache, *args, "--run-dir", str(run_dir), procs=2, script=crash, env={"CRASH_RANK": "1"}
    )
    assert killed.returncode != 0 and time.monotonic() - started < 60
    assert "rank      : 1" in killed.stderr and "SIGKILL" in killed.stderr  # the launcher names the rank
    resumed = launch(isolated_cache, *args, "--run-dir", str(run_dir), procs=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert losses(run_dir) == losses(reference)


def test_a_hung_rank_fails_the_others_after_the_collective_timeout(tmp_path, isolated_cache):
    """Without torchrun to notice (e.g. srun starting every rank), a rank that stops answering makes the
    others fail after --parallel.collective-timeout-s with one line each, instead of waiting forever."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train", *ARGS[:-2], "--steps", "8", "--threads", "1", "--parallel.collective-timeout-s", "5"]
    args += ["--run-dir", str(tmp_path / "run")]
    ranks = []
    for rank in (0, 1):
        env = {
            **os.environ, "OLMO_FN_CACHE": str(isolated_cache), "WORLD_SIZE": "2", "RANK": str(rank),
            "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CRASH_RANK": "1",
        }  # fmt: skip
        command = [sys.executable, str(HERE / "crash_train.py"), "hang-after-step", "2", "--", *args]
        ranks.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    started = time.monotonic()
    try:
        _, err = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 2 and time.monotonic() - started < 60
        assert ranks[1].poll() is None  # still hung: only the timeout ended rank 0
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: rank 0: a collective failed") and "Timed out" in errors[0]
