"""The launch recipes in experiments/ stay valid: shell syntax, and options the train command accepts."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from olmo_fn.config import TrainConfig
from olmo_fn.run import parse

ROOT = Path(__file__).resolve().parents[1]


def test_slurm_script_is_valid_shell_with_a_valid_train_command():
    script = ROOT / "experiments/slurm/olmo2-7b.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    command = re.search(r"-m olmo_fn\.run (train [^\n]*)", text).group(1)
    args = [re.sub(r"\$\{?\w+\}?", "x", a) for a in shlex.split(command.split("#")[0])]
    cfg = parse(args)
    assert isinstance(cfg, TrainConfig) and cfg.preset == "olmo2-7b" and cfg.parallel.dp_shard == -1
    assert cfg.checkpoint.async_save and cfg.data.seq_len == 4096


def test_bench_h100_script_rows_are_valid_bench_commands():
    """Every GPU row of experiments/bench_h100.sh parses as a bench command (no GPU needed)."""
    from olmo_fn.bench import BenchConfig

    script = ROOT / "experiments/bench_h100.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    env = dict(re.findall(r'^(ONE_B|SMALL|MOE)="([^"]*)"', text, re.M))
    rows = re.findall(r'^  "([\w-]+)\|([^"]*)"$', text, re.M)
    assert len(rows) == 13
    for name, args in rows:
        for variable in ("ONE_B", "SMALL", "MOE"):
            args = args.replace(f"${variable}", env[variable])
        args = args.replace("$OUT", "out")
        cfg = parse(["bench", *shlex.split(args)])
        assert isinstance(cfg, BenchConfig) and cfg.seq_len == 4096, name
        assert cfg.preset in ("olmo2-1b", "olmo2-190m", "olmoe-1b-7b"), name


def test_gpu_session_cpu_variant_runs_every_row_of_the_table_once(tmp_path):
    """experiments/gpu_session.sh at CPU sizes: its two calls together run each row of bench_h100.sh
    once, and every row reports ac, fp8, compile and memory; a row name the table lacks is refused."""
    import json
    import os
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "results"
    for part in ("1", "2"):
        done = subprocess.run(
            ["bash", str(ROOT / "experiments/gpu_session.sh"), "--cpu", str(out), part],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    table = re.findall(r'^  "([\w-]+)\|', (ROOT / "experiments/bench_h100.sh").read_text(), re.M)
    assert sorted(r["row"] for r in rows) == sorted(table) and len(table) == 13
    assert not [r for r in rows if r.get("failed")], rows
    by_name = {r["row"]: r["result"] for r in rows}
    assert by_name["1b-fp8-tensorwise"]["fp8"] == "tensorwise (emulated)"
    assert by_name["1b-bf16-ac-selective"]["ac"] == "selective"
    moe = by_name["moe-olmoe-4-layers-bf16"]  # olmoe-tiny on a CPU
    assert (moe["n_experts"], moe["top_k"]) == (8, 2) and moe["active_params"] < moe["params"]
    assert all(r["result"]["peak_mem_gib"] > 0 and r["result"]["tokens_per_s"] > 0 for r in rows)
    assert (out / "profile-1b-bf16" / "profile.txt").read_text().count("aten::mm") >= 1
    assert "torch " in (out / "env.txt").read_text()
    wrong = subprocess.run(
        ["bash", str(ROOT / "experiments/bench_h100.sh"), "--cpu", str(out), "1b-bf17"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert wrong.returncode == 2 and "no row named '1b-bf17'; the rows are: 1b-bf16 " in wrong.stderr
