"""The whole journey: raw text -> prepare-data -> train -> convert to Hugging Face -> transformers generate."""

from __future__ import annotations

import io
import sysconfig
from pathlib import Path

import orjson
import pytest
import torch
import zstandard

from olmo_fn.generate import GenerateConfig, run_generate
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.run import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def write_corpus(directory: Path) -> list[str]:
    """Dolma-style .jsonl.zst shards of stdlib source files; returns the texts."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text() for p in sorted(root.glob("[a-f]*.py"))[:40]]
    directory.mkdir()
    for shard in range(2):
        lines = b"".join(orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in enumerate(texts[shard::2]))
        (directory / f"shard{shard}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    return texts


def train_tokenizer(texts: list[str], path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))


def test_text_to_transformers_generate(tmp_path, capsys):
    texts = write_corpus(tmp_path / "raw")
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer(texts, tokenizer)
    eos = tokenizers.Tokenizer.from_file(str(tokenizer)).token_to_id("<|endoftext|>")

    assert (
        main(
            [
                "prepare-data",
                "--inputs",
                str(tmp_path / "raw/*.jsonl.zst"),
                "--output-dir",
                str(tmp_path / "tokens"),
                "--tokenizer",
                str(tokenizer),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["documents"] == len(texts) and summary["malformed_lines"] == 0

    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data.paths",
                str(tmp_path / "tokens/*.npy"),
                "--data.eos-token-id",
                str(eos),
                "--data.tokenizer",
                str(tokenizer),
                "--data.seq-len",
                "64",
                "--model.vocab-size",
                "512",
                "--model.n-layers",
                "2",
                "--steps",
                "40",
                "--global-batch-size",
                "8",
                "--schedule.warmup-steps",
                "5",
                "--run-dir",
                str(run_dir),
            ]
        )
        == 0
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it learns (40 steps of a tiny model)

    hf_dir = tmp_path / "hf"
    assert main(["convert", "to-hf", str(run_dir), str(hf_dir)]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = "import os\ndef "
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    theirs = hf_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    ours = run_generate(
        GenerateConfig(str(run_dir), (prompt,), max_new_tokens=12, device="cpu"), out=io.StringIO()
    )
    assert ours == [theirs]
