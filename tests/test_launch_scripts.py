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
