"""In-loop evaluation: held-out loss and bits per byte."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from olmo_fn.config import TrainConfig
from olmo_fn.errors import ConfigError
from olmo_fn.evaluate import EvalConfig, bytes_per_token, evaluate, open_eval_data
from olmo_fn.graph import init_params, logits
from olmo_fn.io.byte_tokenizer import BYTE_EOS
from olmo_fn.io.loader import DataConfig
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_step import StepSettings
from olmo_fn.train import train

tokenizers = pytest.importorskip("tokenizers")


def test_eval_loss_and_bits_per_byte_match_a_direct_computation():
    cfg = TrainConfig()
    data = DataConfig(seq_len=32)
    eval_data = open_eval_data(EvalConfig(max_instances=10, batch_size=4), data, cfg.model.vocab_size)
    assert [b.input_ids.shape[0] for b in eval_data.batches] == [4, 3, 3]
    params = init_params(cfg.model, seed=1)
    settings = StepSettings(cfg.model, OptimConfig(), ScheduleConfig(), 1, 4)
    got = evaluate(params, eval_data, settings, torch.device("cpu"))
    ce, n, n_bytes = 0.0, 0, 0
    for b in eval_data.batches:
        out = logits(params, b.input_ids, cfg.model, positions=b.positions, doc_ids=b.doc_ids)
        ce += F.cross_entropy(out.flatten(0, 1).double(), b.labels.flatten(), reduction="sum").item()
        valid = b.labels[b.labels >= 0]
        n += len(valid)
        n_bytes += int((valid != BYTE_EOS).sum())
    assert got["eval/val/tokens"] == n == 10 * 31
    assert got["eval/val/loss"] == pytest.approx(ce / n, rel=1e-5)
    assert got["eval/val/bpb"] == pytest.approx(ce / math.log(2) / n_bytes, rel=1e-5)


def test_no_eval_without_held_out_data():
    data = DataConfig(paths=("x.npy",), eos_token_id=0)
    assert open_eval_data(EvalConfig(), data, 384) is None
    assert open_eval_data(EvalConfig(interval=0), DataConfig(), 384) is None


def test_byte_level_bpe_bytes_per_token_add_up_to_the_text(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [
        "def f(x):\n    return x * 2  # doubles",
        "ünïcödé strings — and emoji 🙂 too",
        "import os\n",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    counts = bytes_per_token(str(tmp_path / "tokenizer.json"), 320)
    for text in ("def g(y): return y", "🙂 ünï", "x" * 50):
        ids = tok.encode(text).ids
        assert counts[ids].sum() == len(text.encode("utf-8"))
    assert counts[tok.token_to_id("<|endoftext|>")] == 0
    assert bytes_per_token("bytes", 300)[[0, 65, 255, 256, 257]].tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*missing.json: no such file"):
        bytes_per_token(str(tmp_path / "missing.json"), 10)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*broken.json: not a valid tokenizer.json"):
        bytes_per_token(str(tmp_path / "broken.json"), 10)


def test_training_logs_eval_at_its_interval_and_at_the_end(tmp_path):
    cfg = dataclasses.replace(
        TrainConfig(),
        steps=5,
        schedule=ScheduleConfig(warmup_steps=1),
        global_batch_size=2,
        run_dir=str(tmp_path / "run"),
        eval=EvalConfig(interval=2, max_instances=4),
        data=DataConfig(seq_len=32),
    )
    rows = read_metrics(train(cfg, progress=False) / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/val/loss" in r] == [2, 4, 5]
    assert all(np.isfinite(r["eval/val/bpb"]) and r["eval_s"] > 0 for r in rows if "eval/val/loss" in r)
