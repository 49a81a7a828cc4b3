"""Fine-tuning end to end through the command line: `prepare-data --format prompt-completion` on a small
JSONL, then `train --init-from` a short pre-training run: every step trains on exactly the completion
tokens (and their EOS), and the loss on them falls."""

from __future__ import annotations

import dataclasses

import orjson

from olmo_fn.config import TrainConfig, config_from_json
from olmo_fn.evaluate import EvalConfig
from olmo_fn.io.loader import DataConfig
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.run import main
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.train import train

PAIRS = [(a, b) for a in range(10) for b in range(10) if a + b <= 9][:40]
SEQ = 40  # every document is "Q: a+b=" (7 bytes) + " c" (2) + EOS: exactly four fill an instance


def test_prepare_then_fine_tune_trains_on_completions_only_and_learns_them(tmp_path):
    base = train(
        dataclasses.replace(
            TrainConfig(),
            model=dataclasses.replace(
                TrainConfig().model, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=64
            ),
            steps=3,
            global_batch_size=2,
            schedule=ScheduleConfig(warmup_steps=1),
            data=DataConfig(seq_len=32),
            eval=EvalConfig(interval=0),
            run_dir=str(tmp_path / "base"),
        ),
        progress=False,
    )
    raw = tmp_path / "sums.jsonl"
    records = [{"prompt": f"Q: {a}+{b}=", "completion": f" {a + b}"} for a, b in PAIRS]
    raw.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    out = tmp_path / "tokens"
    prepare = [
        "prepare-data",
        "--inputs",
        str(raw),
        "--output-dir",
        str(out),
        "--format",
        "prompt-completion",
    ]
    assert main(prepare) == 0
    assert (tmp_path / "tokens" / "sums.npy.loss_mask").stat().st_size == 10 * len(PAIRS)
    steps, batch = 40, 2
    run = tmp_path / "sft"
    fine_tune = [
        "train", "--init-from", str(base), "--data.paths", str(tmp_path / "tokens" / "sums.npy"),
        "--data.eos-token-id", "256", "--data.packing", "documents", "--data.pad-token-id", "257",
        "--data.seq-len", str(SEQ), "--steps", str(steps), "--global-batch-size", str(batch),
        "--schedule.warmup-steps", "2", "--optim.lr", "1e-2", "--eval.interval", "0", "--run-dir", str(run),
    ]  # fmt: skip
    assert main(fine_tune) == 0
    cfg = config_from_json(run / "config.json")
    assert cfg.init_from == str(base) and cfg.model == config_from_json(base / "config.json").model
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # Four documents per instance, each with three targets: " ", the digit and the EOS.
    assert all(r["n_targets"] == batch * 4 * 3 for r in rows)
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.3 * first, (first, last)
