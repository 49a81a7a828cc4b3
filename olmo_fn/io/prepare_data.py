"""`prepare-data`: tokenize raw text (JSON lines, gzip/zstandard, plain text) into OLMo-core token files.

Each input file becomes ``OUTPUT_DIR/<name>.npy``, a raw headerless uint16/uint32 array holding every
document as ``[BOS] tokens EOS``, plus ``<name>.npy.csv.gz`` with one ``start,end`` line per document
(token offsets, end exclusive), and last ``<name>.npy.done.json``, the completion record. With
``--format chat`` or ``--format prompt-completion`` (`olmo_fn.io.supervised_text`) the inputs are
fine-tuning records, and ``<name>.npy.loss_mask`` marks the tokens trained on (`olmo_fn.io.loss_mask`).
Every file is written atomically; a re-run skips the outputs whose record matches the input file,
tokenizer and settings, and redoes the rest. Input files are spread over worker processes; the bytes
written do not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from queue import Empty
from typing import Any, Literal

import numpy as np

from olmo_fn.errors import ConfigError
from olmo_fn.io.prepare_file import (
    MALFORMED_SHOWN,
    FileJob,
    FileResult,
    OutputFiles,
    Report,
    is_complete,
    prepare_file,
)
from olmo_fn.io.prepare_progress import PrepareProgress
from olmo_fn.io.supervised_text import PARSERS, Format
from olmo_fn.io.text_sources import expand_inputs, output_stems
from olmo_fn.io.text_tokenizer import TextTokenizer, TokenizerSpec, load_tokenizer_spec
from olmo_fn.io.token_file import TOKEN_DTYPES

RECORD_VERSION = 1
"""Bumped when the output format changes, so older outputs are redone."""


@dataclasses.dataclass(frozen=True)
class PrepareDataConfig:
    """Tokenize raw text (.jsonl, .jsonl.gz, .jsonl.zst, .txt) into OLMo-core token files with sidecars."""

    inputs: tuple[str, ...]
    """Input files or glob patterns: JSON lines of Dolma-style records (plain, .gz, .zst), or .txt files
    (one document each)."""
    output_dir: str
    """Directory for <name>.npy, <name>.npy.csv.gz and <name>.npy.done.json per input file."""
    tokenizer: str = "bytes"
    """'bytes' (the built-in byte tokenizer, vocab 258) or the path of a Hugging Face tokenizer.json."""
    eos_token_id: int | None = None
    """Appended to every document. Default: 256 for bytes, else the tokenizer's end-of-text token."""
    bos_token_id: int | None = None
    """Prepended to every document when set."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token dtype; auto: uint16 when every id fits, else uint32."""
    workers: int = 0
    """Processes tokenizing input files in parallel; 0: one per CPU."""
    strict: bool = False
    """Stop at the first malformed line instead of skipping and counting it."""
    text_field: str = "text"
    """Field of each JSON record that holds the document text."""
    format: Format = "text"
    """text: one document per record or file. prompt-completion: JSON lines {"prompt", "completion"},
    trained on the completion only; chat: JSON lines {"messages": [{"role", "content"}]} in the template
    "<|role|>\n" + content + "\n" per message, trained on the assistant messages only. Both write a
    <name>.npy.loss_mask sidecar (one byte per token: 1 = trained on as a target)."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.inputs, str):
            problems.append(f"prepare.inputs={self.inputs!r} must be a tuple of paths, not a string")
        elif not self.inputs:
            problems.append("prepare.inputs is empty (give input files or glob patterns)")
        for name in ("output_dir", "tokenizer", "text_field"):
            if not getattr(self, name):
                problems.append(f"prepare.{name} must not be empty")
        for name in ("eos_token_id", "bos_token_id", "workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"prepare.{name}={value} must be >= 0")
        if self.format not in ("text", *PARSERS):
            problems.append(f"prepare.format={self.format!r} must be one of text, {', '.join(PARSERS)}")
        if self.dtype not in ("auto", *TOKEN_DTYPES):
            problems.append(f"prepare.dtype={self.dtype!r} must be one of auto, uint16, uint32")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class PreparePlan:
    """The resolved settings and, per input in order, its job and whether it is already complete."""

    spec: TokenizerSpec
    eos_token_id: int
    bos_token_id: int | None
    dtype: str
    jobs: tuple[FileJob, ...]
    complete: tuple[bool, ...]

    @property
    def todo(self) -> list[FileJob]:
        return [job for job, done in zip(self.jobs, self.complete, strict=True) if not done]


# ---- planning -----------------------------------------------------------------------------------


def plan_prepare_data(cfg: PrepareDataConfig) -> PreparePlan:
    """Check the tokenizer, ids, dtype, inputs and output directory; name each input's outputs and
    find those already complete. Raises before anything is written."""
    spec = load_tokenizer_spec(cfg.tokenizer)
    eos = _resolve_eos(cfg, spec)
    if cfg.bos_token_id is not None and cfg.bos_token_id == eos:
        raise ConfigError(f"prepare.bos_token_id={eos} equals the EOS id; documents are delimited by EOS")
    dtype = _resolve_dtype(cfg, spec, eos)
    inputs = expand_inputs(cfg.inputs)
    output_dir = _output_dir(cfg.output_dir)
    jobs = tuple(
        FileJob(
            path, OutputFiles.for_stem(output_dir, stem), _record_key(path, spec, eos, cfg, dtype), cfg.strict
        )
        for path, stem in zip(inputs, output_stems(inputs), strict=True)
    )
    return PreparePlan(spec, eos, cfg.bos_token_id, dtype, jobs, tuple(map(is_complete, jobs)))


def _resolve_eos(cfg: PrepareDataConfig, spec: TokenizerSpec) -> int:
    if cfg.eos_token_id is not None:
        return cfg.eos_token_id
    if spec.default_eos is None:
        raise ConfigError(
            f"prepare.tokenizer={spec.name} has no recognisable end-of-text special token "
            "(such as <|endoftext|> or </s>); set prepare.eos_token_id (--eos-token-id)"
        )
    return spec.default_eos


def _resolve_dtype(cfg: PrepareDataConfig, spec: TokenizerSpec, eos: int) -> str:
    """The dtype name: auto picks uint16 when the vocab and the EOS/BOS ids all fit in it."""
    id_bound = max(spec.vocab_size, eos + 1, (cfg.bos_token_id or 0) + 1)
    if cfg.dtype == "auto":
        return "uint16" if id_bound <= 2**16 else "uint32"
    limit = np.iinfo(TOKEN_DTYPES[cfg.dtype]).max + 1
    if id_bound > limit:
        raise ConfigError(
            f"prepare.dtype={cfg.dtype} holds ids below {limit}, but prepare.tokenizer={spec.name} needs ids "
            f"up to {id_bound - 1} (vocab {spec.vocab_size}, eos {eos}); use uint32 or auto"
        )
    return cfg.dtype


def _output_dir(name: str) -> Path:
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"prepare.output_dir={name} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"prepare.output_dir={name}: cannot create it ({exc})") from None
    return path


def _record_key(path: Path, spec: TokenizerSpec, eos: int, cfg: PrepareDataConfig, dtype: str) -> dict:
    stat = path.stat()
    return {
        "version": RECORD_VERSION,
        "input": str(path.resolve()),
        "input_size": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "tokenizer": spec.identity,
        "eos_token_id": eos,
        "bos_token_id": cfg.bos_token_id,
        "dtype": dtype,
        "text_field": cfg.text_field,
        **({"format": cfg.format} if cfg.format != "text" else {}),  # text outputs keep today's record
    }


# ---- running the jobs ---------------------------------------------------------------------------


_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
"""Never fork: the parent may hold threads (tokenizers, torch). The fork server imports the main
module once, where spawn would import it (and whatever it imports, e.g. torch) in every worker."""

_WORKER_STATE: tuple[TextTokenizer, Report] | None = None


def _init_worker(spec: TokenizerSpec, queue: Any, rayon_threads: int) -> None:
    """Set up a worker process: its tokenizer, its share of the CPUs, and where it reports progress."""
    global _WORKER_STATE
    os.environ["RAYON_NUM_THREADS"] = str(rayon_threads)  # the tokenizers thread pool starts lazily
    if rayon_threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_STATE = (TextTokenizer(spec), lambda *counts: queue.put(counts))


def _prepare_in_worker(job: FileJob) -> FileResult:
    assert _WORKER_STATE is not None, "worker not initialised"
    return prepare_file(job, *_WORKER_STATE)


def run_jobs(
    jobs: list[FileJob], spec: TokenizerSpec, workers: int, display: PrepareProgress
) -> list[FileResult]:
    """Results of `jobs` in order: in this process for one worker, else in a pool of worker processes.

    After a failure no new job starts; running ones finish, and the error of the first failed job
    (in input order) is raised.
    """
    if workers <= 1:
        tokenizer = TextTokenizer(spec)
        results = []
        for job in jobs:
            results.append(prepare_file(job, tokenizer, display.advance))
            display.file_done()
        return results
    context = multiprocessing.get_context(_START_METHOD)
    queue = context.Queue()
    rayon_threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, context, _init_worker, (spec, queue, rayon_threads)) as pool:
        futures = [pool.submit(_prepare_in_worker, job) for job in jobs]
        _wait_reporting(futures, queue, display)
    failed = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    if failed:
        raise failed[0]
    return [f.result() for f in futures]


def _wait_reporting(futures: list[Future], queue: Any, display: PrepareProgress) -> None:
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        _drain(queue, display.advance)
        for future in done:
            display.file_done()
            if future.exception() is not None:
                for other in pending:
                    other.cancel()
    _drain(queue, display.advance)


def _drain(queue: Any, report: Callable[..., None]) -> None:
    while True:
        try:
            counts = queue.get_nowait()
        except Empty:
            return
        report(*counts)


def run_prepare_data(cfg: PrepareDataConfig, *, progress: bool = True) -> dict[str, Any]:
    """Tokenize `cfg.inputs` into `cfg.output_dir` and return a summary (JSON-ready).

    documents, tokens, text_bytes and malformed_lines count the files written by this run; outputs
    lists every input's token file, including those skipped as already complete.
    """
    start = time.perf_counter()
    plan = plan_prepare_data(cfg)
    todo = plan.todo
    workers = min(cfg.workers or os.cpu_count() or 1, max(1, len(todo)))
    display = PrepareProgress(
        enabled=progress, total_bytes=sum(j.key["input_size"] for j in todo), files=len(todo)
    )
    display.start(_settings_line(plan, workers))
    with display:
        results = run_jobs(todo, plan.spec, workers, display)
    summary = _summary(plan, results, workers, time.perf_counter() - start)
    display.finish(summary)
    return summary


def _settings_line(plan: PreparePlan, workers: int) -> str:
    skipped = len(plan.jobs) - len(plan.todo)
    return (
        f"prepare-data: {len(plan.jobs)} input files ({skipped} already done), tokenizer {plan.spec.name} "
        f"(vocab {plan.spec.vocab_size}), eos {plan.eos_token_id}, bos {plan.bos_token_id}, "
        f"dtype {plan.dtype}, workers {workers}"
        + (f", format {plan.jobs[0].format}" if plan.jobs and plan.jobs[0].format != "text" else "")
    )


def _summary(plan: PreparePlan, results: list[FileResult], workers: int, seconds: float) -> dict[str, Any]:
    seconds = max(seconds, 1e-9)

    def total(name: str) -> int:
        return sum(getattr(r, name) for r in results)

    examples = [e for r in results for e in r.malformed_examples][:MALFORMED_SHOWN]
    return {
        "inputs": len(plan.jobs),
        "files_written": len(results),
        "files_skipped": len(plan.jobs) - len(results),
        "outputs": [str(job.outputs.tokens) for job in plan.jobs],
        "documents": total("documents"),
        "tokens": total("tokens"),
        "text_bytes": total("text_bytes"),
        "empty_documents": total("empty_documents"),
        "malformed_lines": total("malformed_lines"),
        "malformed_examples": examples,
        "tokenizer": plan.spec.name,
        "vocab_size": plan.spec.vocab_size,
        "eos_token_id": plan.eos_token_id,
        "bos_token_id": plan.bos_token_id,
        "dtype": plan.dtype,
        "workers": workers,
        "seconds": round(seconds, 3),
        "documents_per_s": round(total("documents") / seconds, 1),
        "tokens_per_s": round(total("tokens") / seconds, 1),
        "text_mb_per_s": round(total("text_bytes") / 1e6 / seconds, 3),
    }
