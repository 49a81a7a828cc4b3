"""In-loop evaluation: loss and bits per byte on held-out token files."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import orjson
import torch

from olmo_fn.downstream.runner import task_problems
from olmo_fn.errors import ConfigError
from olmo_fn.io.batch import Batch
from olmo_fn.io.byte_tokenizer import BYTE_EOS
from olmo_fn.io.instances import ChunkedTokens, make_batch
from olmo_fn.io.loader import DataConfig, token_file_dtype
from olmo_fn.io.paths import expand_paths
from olmo_fn.io.stdlib_corpus import stdlib_token_file
from olmo_fn.io.text_tokenizer import open_tokenizer_json
from olmo_fn.parallelize.placed_step import Sharding, context_parallel_sum
from olmo_fn.state.train_step import StepSettings, make_loss_sums_fn


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation during training, logged to metrics.jsonl as eval/NAME/loss and .../bpb."""

    paths: tuple[str, ...] = ()
    """Held-out token files (same format, tokenizer and EOS as the training data). Empty: the embedded
    corpus's held-out split when training on the embedded corpus, else no evaluation."""
    name: str = "val"
    """Name in the metrics (eval/NAME/loss)."""
    interval: int = 100
    """Evaluate every this many steps and after the last step; 0: never."""
    max_instances: int = 64
    """How many instances of data.seq_len tokens to evaluate on (the first ones, in file order)."""
    batch_size: int = 16
    """Instances per forward pass (and multiple-choice rows per pass for the downstream tasks)."""
    downstream: tuple[str, ...] | None = None
    """Multiple-choice tasks scored at every evaluation, logged as downstream/TASK/acc, acc_norm, acc_pmi:
    JSON-lines task files (HellaSwag, ARC, PIQA, generic) and/or builtin:next-line. None: builtin:next-line
    when training on the embedded corpus without pipeline parallelism, else none; the flag with no
    task: none."""
    downstream_questions: int = 64
    """Questions per downstream task: the first ones of each file, drawn ones for a built-in task."""

    def __post_init__(self) -> None:
        for field in ("interval", "max_instances", "batch_size", "downstream_questions"):
            if getattr(self, field) < (0 if field == "interval" else 1):
                raise ConfigError(f"eval.{field}={getattr(self, field)} is out of range")
        problems = task_problems(self.downstream) if self.downstream else []
        if problems:
            raise ConfigError("eval.downstream: " + "; ".join(p.removeprefix("tasks: ") for p in problems))


@dataclasses.dataclass(frozen=True)
class EvalData:
    """The fixed evaluation batches and the UTF-8 bytes each token id stands for."""

    name: str
    batches: tuple[Batch, ...]
    bytes_per_token: np.ndarray


def open_eval_data(cfg: EvalConfig, data: DataConfig, vocab_size: int) -> EvalData | None:
    """The evaluation set, or None when there is none to run."""
    embedded = not (data.paths or data.sources)
    if (not cfg.paths and not embedded) or cfg.interval == 0:
        return None
    paths = expand_paths(cfg.paths, "eval.paths") if cfg.paths else [stdlib_token_file("validation")]
    eos = BYTE_EOS if embedded else data.eos_token_id
    chunks = ChunkedTokens.open(paths, token_file_dtype(data, vocab_size), data.seq_len)
    indices = np.arange(min(cfg.max_instances, len(chunks)))
    batches = tuple(
        make_batch(chunks.tokens(part, vocab_size), eos, chunks.loss_masks(part))
        for part in np.array_split(indices, math.ceil(len(indices) / cfg.batch_size))
    )
    return EvalData(cfg.name, batches, bytes_per_token(data.tokenizer, vocab_size))


def bytes_per_token(tokenizer: str, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for (special tokens: 0). A ConfigError names a
    data.tokenizer that is missing or does not parse."""
    if tokenizer == "bytes":
        counts = np.zeros(vocab_size, np.int64)
        counts[:256] = 1
        return counts
    return _tokenizer_json_bytes(tokenizer, vocab_size)


@functools.lru_cache(maxsize=4)
def _tokenizer_json_bytes(path: str, vocab_size: int) -> np.ndarray:
    tok = open_tokenizer_json(path, f"data.tokenizer={path}")
    spec = orjson.loads(tok.to_str())
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    special = {added["id"] for added in spec.get("added_tokens", []) if added.get("special")}
    counts = np.zeros(vocab_size, np.int64)
    for token_id in range(min(vocab_size, tok.get_vocab_size())):
        token = tok.id_to_token(token_id)
        if token is None or token_id in special:
            continue
        # Byte-level BPE spells every byte as one character; otherwise decode the token alone.
        counts[token_id] = len(token) if byte_level else len(tok.decode([token_id]).encode("utf-8"))
    return counts


def eval_loss_sums(settings: StepSettings, sharding: Sharding | None = None):
    """``loss_sums(params, batch) -> (ce_sum, z_sum, n_targets)`` as evaluation runs it: forward only,
    eager (the eval batch shape differs from training's, and a compiled block would compile again).
    Build it once per run: under pipeline parallelism it holds the stages and their schedule."""
    eager = dataclasses.replace(settings, compile=False)
    if sharding is not None and sharding.pipeline is not None:
        from olmo_fn.state.pipeline_step import make_pipeline_loss_sums_fn

        return make_pipeline_loss_sums_fn(eager, sharding)
    return make_loss_sums_fn(eager, sharding)


@torch.no_grad()
def evaluate(
    params,
    eval_data: EvalData,
    settings: StepSettings,
    device: torch.device,
    sharding: Sharding | None = None,
    *,
    loss_sums=None,
) -> dict[str, float]:
    """``eval/NAME/loss`` (mean cross-entropy, nats), ``.../bpb`` (bits per byte), ``.../tokens``.

    With a `sharding` (collective): every rank evaluates every batch with its placed parameters, so
    each has the whole result (simple, and the eval set is small next to training); context-parallel
    ranks add up their slices. loss_sums: `eval_loss_sums` of these settings, kept by the caller
    between evaluations (None: built for this call)."""
    ce_total, targets, n_bytes = 0.0, 0, 0
    if loss_sums is None:
        loss_sums = eval_loss_sums(settings, sharding)
    for batch in eval_data.batches:
        batch = batch.to(device)
        ce_sum, _, n = loss_sums(params, batch)
        ce_sum, n = context_parallel_sum(ce_sum, sharding), context_parallel_sum(n, sharding)
        ce_total += float(ce_sum)
        targets += int(n)
        labels = batch.labels[batch.labels >= 0].cpu().numpy()
        n_bytes += int(eval_data.bytes_per_token[labels].sum())
    prefix = f"eval/{eval_data.name}"
    out = {f"{prefix}/loss": ce_total / max(1, targets), f"{prefix}/tokens": targets}
    if n_bytes:
        out[f"{prefix}/bpb"] = ce_total / math.log(2) / n_bytes
    return out
