"""`bench-prepare`: how fast `prepare-data` tokenizes, with a small trained BPE and with the byte tokenizer.

Needs no download: the input is the embedded Python standard-library corpus, written as zstandard
JSON-lines shards of Dolma-style records, and the BPE tokenizer is trained on that text here.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson
import zstandard

from olmo_fn.errors import ConfigError
from olmo_fn.io.prepare_data import PrepareDataConfig, run_prepare_data
from olmo_fn.io.stdlib_corpus import select_stdlib_sources

END_OF_TEXT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class PrepareBenchConfig:
    """Time prepare-data on the embedded stdlib corpus with a BPE trained here and with bytes; print JSON."""

    target_mb: float = 8
    """Megabytes (10^6 bytes) of source text to tokenize."""
    shards: int = 8
    """Number of .jsonl.zst input files the text is split into."""
    vocab_size: int = 4096
    """Vocabulary size of the BPE tokenizer trained for the benchmark."""
    workers: int = 0
    """Worker processes for prepare-data; 0: one per CPU."""

    def __post_init__(self) -> None:
        if self.target_mb <= 0:
            raise ConfigError(f"bench_prepare.target_mb={self.target_mb} must be > 0")
        if self.shards < 1:
            raise ConfigError(f"bench_prepare.shards={self.shards} must be >= 1")
        if self.workers < 0:
            raise ConfigError(f"bench_prepare.workers={self.workers} must be >= 0")
        if self.vocab_size < 257:
            raise ConfigError(f"bench_prepare.vocab_size={self.vocab_size} must be >= 257 (bytes + EOS)")


def write_dolma_shards(sources: list[tuple[str, bytes]], directory: Path, shards: int) -> list[Path]:
    """`sources` as Dolma-style records ({"id", "text", "source"}) in `shards` .jsonl.zst files."""
    paths = []
    compressor = zstandard.ZstdCompressor(level=3)
    for shard in range(shards):
        lines = [
            orjson.dumps({"id": name, "text": data.decode("utf-8"), "source": "python-stdlib"}) + b"\n"
            for name, data in sources[shard::shards]
        ]
        path = directory / f"stdlib-{shard:04d}.jsonl.zst"
        path.write_bytes(compressor.compress(b"".join(lines)))
        paths.append(path)
    return paths


def train_bpe_tokenizer(texts: list[str], vocab_size: int, path: Path) -> Path:
    """Train a byte-level BPE of `vocab_size` ids (END_OF_TEXT among them) on `texts`; save it at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return path


def _timed_prepare(inputs: list[Path], output_dir: Path, tokenizer: str, workers: int) -> dict[str, Any]:
    cfg = PrepareDataConfig(
        inputs=tuple(map(str, inputs)), output_dir=str(output_dir), tokenizer=tokenizer, workers=workers
    )
    summary = run_prepare_data(cfg, progress=False)
    return {
        "vocab_size": summary["vocab_size"],
        "dtype": summary["dtype"],
        "documents": summary["documents"],
        "tokens": summary["tokens"],
        "seconds": summary["seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "documents_per_s": summary["documents_per_s"],
        "text_mb_per_s": summary["text_mb_per_s"],
        "workers": summary["workers"],
    }


def run_prepare_bench(cfg: PrepareBenchConfig) -> dict[str, Any]:
    """Build the inputs and tokenizer in a temporary directory, time prepare-data with each tokenizer,
    and return the figures with the machine and package versions."""
    sources = select_stdlib_sources(int(cfg.target_mb * 1e6))
    with tempfile.TemporaryDirectory(prefix="olmo_fn-bench-prepare-") as tmp:
        root = Path(tmp)
        inputs = write_dolma_shards(sources, root, cfg.shards)
        start = time.perf_counter()
        texts = [data.decode("utf-8") for _, data in sources]
        bpe_path = train_bpe_tokenizer(texts, cfg.vocab_size, root / "tokenizer.json")
        train_seconds = time.perf_counter() - start
        bpe = _timed_prepare(inputs, root / "bpe", str(bpe_path), cfg.workers)
        byte = _timed_prepare(inputs, root / "bytes", "bytes", cfg.workers)
    return {
        "text_mb": round(sum(len(data) for _, data in sources) / 1e6, 3),
        "documents": len(sources),
        "shards": cfg.shards,
        "bpe_train_s": round(train_seconds, 3),
        "bpe": bpe,
        "bytes": byte,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in ("tokenizers", "zstandard", "numpy", "orjson")},
        "platform": sys.platform,
    }
