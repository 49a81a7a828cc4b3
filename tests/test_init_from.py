"""`train --init-from`: a new run from the weights of a run, checkpoint, export or Hugging Face model.

Checked against what the source itself computes: transformers' own loss for a Hugging Face model, a
float64 reference model for olmo_fn weights; and attacked on the resume side (a run that has
checkpoints never reads its source again, even when it is gone or another one is named).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

import olmo_fn.train as train_module
from olmo_fn.config import TrainConfig, config_from_json
from olmo_fn.errors import CheckpointError, ConfigError
from olmo_fn.evaluate import EvalConfig
from olmo_fn.graph.param_tree import flatten
from olmo_fn.init_from import with_init_source
from olmo_fn.io.loader import DataConfig, open_training_data
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.run import main, parse
from olmo_fn.state.checkpoint import list_checkpoints, load_checkpoint, read_manifest
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_state import empty_train_state
from olmo_fn.train import start_state, train

import reference as ref
from faults import stop_after_step

transformers = pytest.importorskip("transformers")

TINY = dataclasses.replace(
    TrainConfig().model, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=64
)
BASE = dataclasses.replace(
    TrainConfig(),
    model=TINY,
    steps=3,
    global_batch_size=2,
    schedule=ScheduleConfig(warmup_steps=1),
    data=DataConfig(seq_len=32),
    eval=EvalConfig(interval=0),
)
FLAGS = [
    *("--global-batch-size", "2", "--data.seq-len", "32"),
    *("--schedule.warmup-steps", "1", "--eval.interval", "0"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A short olmo_fn run: the source the fine-tuning runs start from (checkpoint at step 3)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    return train(dataclasses.replace(BASE, run_dir=str(run_dir)), progress=False)


def final_state(run_dir: Path):
    return load_checkpoint(run_dir / "checkpoints" / "step3", empty_train_state(TINY, device="cpu"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---- the initial state ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["run", "checkpoint", "export"])
def test_a_new_run_starts_from_the_source_weights_at_step_zero_with_zero_moments(base, tmp_path, kind):
    source = {"run": base, "checkpoint": base / "checkpoints" / "step3", "export": tmp_path / "export"}[kind]
    if kind == "export":
        assert main(["checkpoint", "export", str(base), str(source)]) == 0
    cfg = dataclasses.replace(with_init_source(BASE, str(source)), steps=2, run_dir=str(tmp_path / "new"))
    assert cfg.model == TINY and cfg.init_from == str(source)
    data = open_training_data(cfg.data, cfg.model.vocab_size, seed=cfg.seed, total_instances=4)
    state, start, _ = start_state(cfg, tmp_path / "new", torch.device("cpu"), data)
    expected = final_state(base)
    assert start.kind == "new" and (state.step, state.data_cursor, state.tokens_seen) == (0, 0, 0)
    got, want = flatten(state.params), flatten(expected.params)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(t.dtype == torch.float32 and t.requires_grad for t in got.values())
    source_moments = flatten(expected.opt_state)
    assert all(t.abs().sum() > 0 for t in source_moments.values()), "the source has moments to leak"
    moments = flatten(state.opt_state)
    assert moments.keys() == source_moments.keys() and all(not t.any() for t in moments.values())
    assert not (tmp_path / "new").exists(), "deciding the start writes nothing"


def test_the_first_loss_of_a_run_from_olmo_fn_weights_is_the_sources_loss(base, tmp_path):
    run_dir = tmp_path / "ft"
    argv = ["train", "--init-from", str(base), "--steps", "2", *FLAGS, "--run-dir", str(run_dir)]
    assert main(argv) == 0
    cfg = config_from_json(run_dir / "config.json")
    assert cfg.init_from == str(base) and cfg.model == TINY
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["tokens_seen"] == 2 * 2 * 32
    data = open_training_data(cfg.data, cfg.model.vocab_size, seed=cfg.seed, total_instances=4)
    batch = data.batch(0, 2)  # the run's first batch: its data start from the beginning
    params = final_state(base).params.apply(lambda t: t.detach().double())
    logits = ref.logits(params, batch.input_ids, batch.positions, batch.doc_ids, TINY)
    ce, _, n = ref.cross_entropy_sums(logits, batch.labels)
    assert rows[0]["loss"] == pytest.approx(ce / n, rel=1e-5, abs=1e-6)
    assert rows[0]["n_targets"] == n


# ---- a Hugging Face model -------------------------------------------------------------------------

HF_CONFIGS = {
    "olmo2": (
        "Olmo2Config",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
}
HF_VOCAB = 97


def save_hf_model(directory: Path, arch: str):
    config_name, sizes = HF_CONFIGS[arch]
    config = getattr(transformers, config_name)(
        vocab_size=HF_VOCAB,
        attn_implementation="eager",
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=None,
        initializer_range=0.1,
        **sizes,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms off 1, so a misplaced norm would show in the loss
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def write_random_tokens(path: Path, n: int, high: int, seed: int = 0) -> Path:
    """A token file of random ids in [2, high): no EOS (HF_VOCAB - 1), so every row is one document."""
    rng = np.random.default_rng(seed)
    rng.integers(2, high, n).astype(np.uint16).tofile(path)
    return path


@pytest.mark.parametrize("arch", list(HF_CONFIGS))
def test_the_first_loss_of_a_run_from_a_hugging_face_model_is_transformers_loss(arch, tmp_path):
    model = save_hf_model(tmp_path / "hf", arch)
    tokens = write_random_tokens(tmp_path / "tokens.npy", 4 * 24, HF_VOCAB - 1)
    run_dir = tmp_path / "ft"
    argv = [
        "train", "--init-from", str(tmp_path / "hf"), "--steps", "1", "--global-batch-size", "3",
        "--data.seq-len", "24", "--data.paths", str(tokens), "--data.eos-token-id", str(HF_VOCAB - 1),
        "--schedule.warmup-steps", "1", "--eval.interval", "0", "--dtype", "float32", "--run-dir", str(run_dir),
    ]  # fmt: skip
    assert main(argv) == 0
    cfg = config_from_json(run_dir / "config.json")
    assert cfg.model.vocab_size == HF_VOCAB
    assert cfg.model.block == ("pre_norm" if arch == "llama" else "reordered_norm")
    (row,) = read_metrics(run_dir / "metrics.jsonl")
    batch = open_training_data(cfg.data, HF_VOCAB, seed=cfg.seed, total_instances=3).batch(0, 3)
    with torch.no_grad():  # transformers shifts the labels itself and averages over every target
        expected = model(input_ids=batch.input_ids, labels=batch.input_ids).loss.item()
    assert abs(row["loss"] - expected) < 1e-5, (row["loss"], expected)
    assert row["n_targets"] == 3 * 23


# ---- the model and tokenizer come from the source -------------------------------------------------


def test_overrides_that_change_shapes_are_refused_by_name_and_others_are_kept(base, tmp_path, capsys):
    new = tmp_path / "new"
    for flags, named in [
        (["--model.d-model", "64"], "model.d_model=64 (the source has 32)"),
        (["--model.n-layers", "3"], "model.n_layers=3 (the source has 2)"),
        (["--model.no-qk-norm"], "model.qk_norm=False (the source has True)"),
    ]:
        assert main(["train", "--init-from", str(base), *flags, *FLAGS, "--run-dir", str(new)]) == 2
        err = one_line_error(capsys)
        assert named in err and f"init_from={base}" in err, err
        assert not new.exists()
    assert main(["train", "--init-from", str(base), "--preset", "olmo2-14m", "--run-dir", str(new)]) == 2
    assert "--preset olmo2-14m and --init-from" in one_line_error(capsys)
    cfg = parse(["train", "--init-from", str(base), "--model.rope-theta", "10000", "--run-dir", str(new)])
    assert cfg.model == dataclasses.replace(TINY, rope_theta=10000.0)
    data = open_training_data(cfg.data, cfg.model.vocab_size, seed=0, total_instances=cfg.steps * 16)
    state, _, _ = start_state(cfg, new, torch.device("cpu"), data)  # shapes agree: accepted
    assert torch.equal(flatten(state.params)["embeddings"], flatten(final_state(base).params)["embeddings"])


def write_tokenizer(path: Path, vocab: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path.write_text(tokenizer.to_str(pretty=False))
    return path


def test_the_sources_tokenizer_becomes_the_runs_and_another_is_refused(tmp_path, capsys):
    save_hf_model(tmp_path / "hf", "olmo2")
    capsys.readouterr()  # transformers' own progress output
    words = ["<|endoftext|>", "<unk>", *(f"w{i}" for i in range(HF_VOCAB - 2))]
    own = write_tokenizer(tmp_path / "hf" / "tokenizer.json", words)
    same = tmp_path / "copy.json"
    same.write_text(orjson.dumps(orjson.loads(own.read_bytes()), option=orjson.OPT_INDENT_2).decode())
    other = write_tokenizer(tmp_path / "other.json", list(reversed(words)))
    tokens = write_random_tokens(tmp_path / "tokens.npy", 4 * 24, HF_VOCAB - 1)
    data_flags = ["--data.paths", str(tokens), "--data.eos-token-id", "0", "--data.seq-len", "24"]
    common = ["train", "--init-from", str(tmp_path / "hf"), *data_flags, "--run-dir", str(tmp_path / "ft")]

    def start(cfg, vocab=HF_VOCAB):
        data = open_training_data(cfg.data, vocab, seed=0, total_instances=cfg.steps * 16)
        return start_state(cfg, tmp_path / "ft", torch.device("cpu"), data)

    assert parse(common).data.tokenizer == str(own)
    no_eos = [a for a in common if a not in ("--data.eos-token-id", "0")]
    assert parse(no_eos).data.eos_token_id == 0, "the EOS of the source's config.json"
    assert parse([*no_eos, "--data.eos-token-id", "5"]).data.eos_token_id == 5, "unless the data says"
    start(parse(common))  # its own tokenizer: accepted
    start(parse([*common, "--data.tokenizer", str(same)]))  # the same tokenizer in another file
    assert main([*common, "--data.tokenizer", str(other), "--eval.interval", "0"]) == 2
    err = one_line_error(capsys)
    assert f"data.tokenizer={other} is not the tokenizer of init_from={tmp_path / 'hf'}" in err
    assert str(own) in err and not (tmp_path / "ft").exists()
    with pytest.raises(ConfigError, match="the embedded corpus is byte-tokenized"):
        # (opened for a byte-sized vocabulary: a real model's is larger than this tiny one's)
        start(parse(["train", "--init-from", str(tmp_path / "hf"), "--run-dir", str(tmp_path / "ft")]), 384)


def test_a_byte_tokenized_source_refuses_data_of_another_tokenizer(base, tmp_path):
    tokens = write_random_tokens(tmp_path / "tokens.npy", 4 * 32, 256)
    other = write_tokenizer(tmp_path / "other.json", ["<|endoftext|>", "<unk>", "a"])
    cfg = parse(
        ["train", "--init-from", str(base), "--data.paths", str(tokens),
         "--data.tokenizer", str(other), "--run-dir", str(tmp_path / "ft"), *FLAGS]
    )  # fmt: skip
    assert cfg.data.eos_token_id == 256, "the byte tokenizer's EOS, which the source trained with"
    data = open_training_data(cfg.data, TINY.vocab_size, seed=0, total_instances=cfg.steps * 2)
    with pytest.raises(ConfigError, match=r"is not the tokenizer of init_from=.*\(bytes\)"):
        start_state(cfg, tmp_path / "ft", torch.device("cpu"), data)


def test_a_source_that_is_not_there_or_an_empty_name_is_one_line(tmp_path, capsys):
    assert main(["train", "--init-from", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "no such run directory, checkpoint, export or model" in one_line_error(capsys)
    with pytest.raises(ConfigError, match="init_from='' must name"):
        TrainConfig(init_from="")
    cfg = TrainConfig(init_from=str(tmp_path / "nothing"), run_dir=str(tmp_path / "r"))  # a notebook's config
    data = open_training_data(cfg.data, cfg.model.vocab_size, seed=0, total_instances=16)
    with pytest.raises(CheckpointError, match="no such model"):
        start_state(cfg, tmp_path / "r", torch.device("cpu"), data)
    assert not (tmp_path / "r").exists()


# ---- resuming -------------------------------------------------------------------------------------


def run_until(argv: list[str], monkeypatch, step: int) -> None:
    """`main(argv)`, stopped as by Ctrl-C right after update `step`."""

    def interrupt():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        stop_after_step(train_module, step, interrupt, patch.setattr)
        assert main(argv) == 130


def test_a_resumed_run_continues_from_its_checkpoints_and_never_reads_its_source_again(
    base, tmp_path, monkeypatch, capsys
):
    source = tmp_path / "source"
    shutil.copytree(base, source)
    flags = [*FLAGS, "--steps", "6", "--checkpoint.interval", "2"]
    reference = tmp_path / "reference"
    assert main(["train", "--init-from", str(source), *flags, "--run-dir", str(reference)]) == 0
    run = tmp_path / "run"
    run_until(["train", "--init-from", str(source), *flags, "--run-dir", str(run)], monkeypatch, 3)
    assert [s for s, _ in list_checkpoints(run)] == [2]
    shutil.rmtree(source)  # the same command resumes without it
    run_until(["train", "--init-from", str(source), *flags, "--run-dir", str(run)], monkeypatch, 5)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    capsys.readouterr()
    # Another source, of other shapes, named on resume: ignored too (never a re-initialisation).
    save_hf_model(tmp_path / "hf", "olmo2")
    assert main(["train", "--run-dir", str(run), "--init-from", str(tmp_path / "hf")]) == 0
    assert "resuming" in capsys.readouterr().err
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert losses == [r["loss"] for r in read_metrics(reference / "metrics.jsonl")]  # bit for bit
    assert config_from_json(run / "config.json").init_from == str(source)  # where its weights came from
    assert read_manifest(run / "checkpoints" / "step6")["config"]["init_from"] == str(source)
    final, expected = (
        load_checkpoint(d / "checkpoints" / "step6", empty_train_state(TINY, device="cpu"))
        for d in (run, reference)
    )
    a, b = flatten(final.params), flatten(expected.params)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_defaults_of_a_resumed_run_come_from_its_own_config_not_the_source(base, tmp_path):
    """`train --run-dir DIR --init-from X` on a run that holds a config takes DIR's model (X unread)."""
    run = tmp_path / "run"
    run.mkdir()
    saved = dataclasses.replace(BASE, init_from=str(base), run_dir=str(run))
    (run / "config.json").write_bytes(orjson.dumps(dataclasses.asdict(saved)))
    cfg = parse(["train", "--run-dir", str(run), "--init-from", str(tmp_path / "missing")])
    assert cfg.model == TINY and cfg.init_from == str(tmp_path / "missing")
