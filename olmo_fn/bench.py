"""`bench`: train on random tokens and report throughput, MFU, memory and first-step time."""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, Literal

import torch
import torch.distributed as dist

from olmo_fn.config import DEFAULT_PRESET, PresetName
from olmo_fn.errors import ConfigError
from olmo_fn.graph.config import ModelConfig, matrix_dims
from olmo_fn.graph.flops import active_params, count_params, flops_per_token
from olmo_fn.graph.model import AttentionBackend
from olmo_fn.graph.presets import PRESETS
from olmo_fn.io.batch import Batch
from olmo_fn.io.instances import make_batch
from olmo_fn.parallelize.activation_checkpoint import ActivationCheckpointing, checkpointing_problems
from olmo_fn.parallelize.fp8 import Fp8Recipe, fp8_problems
from olmo_fn.parallelize.mesh import launched_world
from olmo_fn.parallelize.parallel_config import ParallelConfig, resolve_mesh_shape
from olmo_fn.parallelize.world import World, start_world
from olmo_fn.runtime import (
    device_name,
    fp8_emulated,
    resolve_device,
    resolve_dtype,
    resolve_loss_chunk,
    run_compiles,
)
from olmo_fn.state.checkpoint import latest_checkpoint, load_checkpoint
from olmo_fn.state.checkpoint_writer import CheckpointConfig, CheckpointWriter
from olmo_fn.state.compiled_step import step_compile_problems
from olmo_fn.state.moe_terms import moe_run_problems
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_state import empty_train_state, init_train_state
from olmo_fn.state.train_step import StepSettings, make_train_step

FLOP_FORMULA = "6*N_matmul + 12*n_layers*n_heads*d_head*seq_len per token (attention not halved for causal)"

# Dense bf16 tensor-core peaks (datasheet), by a substring of the device name.
PEAK_BF16_TFLOPS = {"H100": 989.5, "H200": 989.5, "A100": 312.0}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Train on random tokens for a few steps and print one JSON line of throughput figures."""

    preset: PresetName = DEFAULT_PRESET
    """Model size; --model.* options override single fields of it."""
    model: ModelConfig = PRESETS[DEFAULT_PRESET]
    seq_len: int = 256
    """Tokens per sequence (train's --data.seq-len; either spelling works in both commands)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass (--micro-batch works too)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    steps: int = 10
    """Optimizer steps in all, warmup included."""
    warmup: int = 2
    """Leading steps left out of tokens_per_s (the first one is reported as first_step_s)."""
    seed: int = 0
    """Seeds the parameter init and the random tokens."""
    optim: OptimConfig = OptimConfig(implementation="fused")
    document_masking: bool = True
    """Build document masks as training does (random rows hold one document each)."""
    attention_backend: AttentionBackend = "auto"
    """auto: FlexAttention on CUDA, SDPA with a dense mask elsewhere."""
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype (parameters and optimizer state stay fp32). auto: bfloat16 on CUDA, float32 on CPU."""
    compile: Literal["auto", "on", "off", "step"] = "auto"
    """on: compile the transformer block with torch.compile (one graph for all layers); step: compile
    the whole update (forward, backward, clipping, AdamW) as one graph, in one process; auto: on for
    CUDA (and wherever --ac budget needs the compiler), else off."""
    ac: ActivationCheckpointing = "none"
    """Activation checkpointing policy of every block: none, full, selective or budget (as in train)."""
    ac_budget: float = 0.5
    """With --ac budget: the share of an unchecked block's activations that may be kept."""
    fp8: Fp8Recipe = "none"
    """Multiply the block linears in float8 through torchao (the fp8 extra): tensorwise or rowwise
    dynamic scaling; the embedding and LM head stay in the compute dtype. Emulated on CPU."""
    loss_chunk_tokens: int | None = None
    """LM head and loss this many positions at a time; None (auto): chunked for large logits; 0: never."""
    profile_dir: str | None = None
    """After the timed steps, profile two more with torch.profiler: writes profile.txt (the ops and
    kernels that took the most time, self and total) and trace.json (for Perfetto) into this directory."""
    track_memory: bool = False
    """After the timed steps, run one more under torch's memory tracker and report the peak bytes of
    the tensors the step makes (activations, gradients, temporaries; not the parameters and optimizer
    state it starts with), by kind. Slow; works on CPU too."""
    checkpoint_interval: int = 0
    """Also save a checkpoint every this many timed steps (into a temporary directory); 0: never."""
    async_save: bool = False
    """Overlap those checkpoint writes with the following steps."""
    peak_tflops: float | None = None
    """Peak FLOP/s of the device in TFLOP/s for MFU; default: the bf16 datasheet peak of known GPUs."""
    parallel: ParallelConfig = ParallelConfig()
    """Under torchrun: how the processes split the work (each data-parallel rank trains micro-batches of
    its own); tokens_per_s counts them all. torchrun with one process measures a 1-rank plan."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch_size", "grad_accum", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench.{name}={getattr(self, name)} must be >= 1")
        if self.checkpoint_interval < 0:
            raise ConfigError(f"bench.checkpoint_interval={self.checkpoint_interval} must be >= 0")
        problems = checkpointing_problems(
            self.ac, self.ac_budget, self.parallel.pp_schedule if self.parallel.pp > 1 else None
        )
        problems += fp8_problems(self.fp8, matrix_dims(self.model))
        problems += moe_run_problems(
            self.model, self.parallel, compile_step=self.compile == "step", fp8=self.fp8
        )
        if self.compile == "step":
            problems += step_compile_problems(self, sharded=self.parallel.splits_work)
        if problems:
            raise ConfigError("bench: " + "; ".join(problems))
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 0:
            raise ConfigError(f"bench.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0: never)")
        if not 0 < self.warmup < self.steps:
            raise ConfigError(f"bench.warmup={self.warmup} must be between 1 and steps-1={self.steps - 1}")


def _moe_figures(
    model: ModelConfig, metrics: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """An MoE model's routing, how its experts ran, and the last step's expert load ({} for a dense
    model)."""
    if not model.moe.enabled:
        return {}
    from olmo_fn.graph.moe import experts_path

    like = torch.empty(0, dtype=dtype, device=device)
    return {
        "n_experts": model.moe.n_experts,
        "top_k": model.moe.top_k,
        "experts": experts_path(model.moe, like, model.d_model),
        "load_max": round(float(metrics["moe/load_max"]), 4),
        "load_min": round(float(metrics["moe/load_min"]), 4),
    }


def _peak_flops(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> float | None:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak resident set size of the process
    return kib / 2**20


def _profiled_steps(step_fn, state, batches: list[Batch], device: torch.device, out: str):
    """Steps under torch.profiler; the table of the costliest ops and a Chrome trace go into `out`."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for batch in batches:
            state, _ = step_fn(state, batch)
        _sync(device)
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    (directory / "profile.txt").write_text(table + "\n")
    prof.export_chrome_trace(str(directory / "trace.json"))
    return state, {"profile": str(directory / "profile.txt")}


def _tracked_step(step_fn, state, batch: Batch, device: torch.device):
    """One more step under torch's memory tracker: the peak bytes of the tensors it makes, by kind."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        state, _ = step_fn(state, batch)
        _sync(device)
        peak = tracker.get_tracker_snapshot("peak").get(device, {})
    kinds = {
        str(kind.value).lower(): round(b / 2**30, 4) for kind, b in peak.items() if kind != "Total" and b
    }
    return state, {"tracked_peak_gib": round(peak.get("Total", 0) / 2**30, 4), "tracked_by_kind_gib": kinds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _checkpoint_figures(run_dir: str, writer: CheckpointWriter, cfg: BenchConfig, device) -> dict[str, Any]:
    """Size of the last checkpoint, time the saves blocked training, and time to load it back."""
    path = latest_checkpoint(run_dir)
    saves = (cfg.steps - cfg.warmup) // cfg.checkpoint_interval
    t0 = time.perf_counter()
    load_checkpoint(path, empty_train_state(cfg.model, device=device))
    _sync(device)
    load_s = time.perf_counter() - t0
    return {
        "checkpoint_interval": cfg.checkpoint_interval,
        "async_save": cfg.async_save,
        "checkpoint_mib": round(sum(p.stat().st_size for p in path.iterdir()) / 2**20, 2),
        "save_blocking_s": round(writer.blocking_s / max(1, saves), 4),
        "load_s": round(load_s, 4),
    }


@contextlib.contextmanager
def _shared_scratch(world: World | None):
    """A temporary directory every rank writes into (rank 0 makes it and names it to the others)."""
    if world is None:
        with tempfile.TemporaryDirectory(prefix="olmo_fn-bench-") as scratch:
            yield scratch
        return
    scratch = world.broadcast(tempfile.mkdtemp(prefix="olmo_fn-bench-") if world.is_coordinator else None)
    try:
        yield scratch
    finally:
        world.barrier()
        if world.is_coordinator:
            shutil.rmtree(scratch, ignore_errors=True)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; returns the figures that `main` prints as one JSON line (under torchrun,
    rank 0 prints them)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    compiled = run_compiles(cfg, device)
    if cfg.compile == "step" and launched_world()[1] > 1:
        raise ConfigError("compile=step runs in one process; under torchrun use compile=on")
    if cfg.track_memory and (compiled or cfg.compile == "step"):
        raise ConfigError(
            "track_memory uses a torch dispatch mode, which torch.compile cannot trace: pass --compile off "
            "(a compiled run's peak_mem_gib is the CUDA allocator's peak)"
        )
    batch_rows = cfg.micro_batch_size * cfg.grad_accum  # per data-parallel rank
    dp = resolve_mesh_shape(cfg.parallel, launched_world()[1]).dp
    world, device = start_world(
        cfg.parallel,
        cfg.model,
        device,
        dtype,
        global_batch=batch_rows * dp,
        micro_batch=cfg.micro_batch_size,
        seq_len=cfg.seq_len,
    )
    settings = StepSettings(
        model=cfg.model,
        optim=cfg.optim,
        schedule=ScheduleConfig(warmup_steps=1),
        total_steps=cfg.steps,
        micro_batch_size=cfg.micro_batch_size,
        compute_dtype=dtype,
        attention_backend=cfg.attention_backend,
        document_masking=cfg.document_masking,
        compile=compiled,
        ac=cfg.ac,
        ac_budget=cfg.ac_budget,
        loss_chunk_tokens=resolve_loss_chunk(
            cfg.loss_chunk_tokens, cfg.micro_batch_size * cfg.seq_len, cfg.model.vocab_size
        ),
        fp8=cfg.fp8,
        fp8_emulate=fp8_emulated(device),
        compile_step=cfg.compile == "step",
    )
    step_fn = make_train_step(settings, world.sharding if world is not None else None)
    state = init_train_state(cfg.model, seed=cfg.seed, device=device)
    if world is not None:
        state = world.place(state)
    dp_rank = world.sharding.layout.dp_rank if world is not None else 0
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + dp_rank)  # each rank its own rows

    def random_batch() -> Batch:
        tokens = torch.randint(
            0, cfg.model.vocab_size, (batch_rows, cfg.seq_len), device=device, generator=gen
        )
        return make_batch(tokens, eos=-1)  # no document boundaries inside random rows

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, random_batch())
    _sync(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(cfg.warmup - 1):
        state, metrics = step_fn(state, random_batch())
    _sync(device)
    with _shared_scratch(world) as scratch:
        checkpoint_cfg = CheckpointConfig(
            interval=cfg.checkpoint_interval, keep_last=1, async_save=cfg.async_save
        )
        with CheckpointWriter(scratch, checkpoint_cfg) as writer:
            t0 = time.perf_counter()
            for _ in range(cfg.steps - cfg.warmup):
                state, metrics = step_fn(state, random_batch())
                if cfg.checkpoint_interval and state.step % cfg.checkpoint_interval == 0:
                    writer.save(state)
            writer.wait()  # a write still in flight belongs to the timed steps
            _sync(device)
            step_s = (time.perf_counter() - t0) / (cfg.steps - cfg.warmup)
        checkpoint_figures = (
            _checkpoint_figures(scratch, writer, cfg, device) if writer.last_saved_step else {}
        )

    profiled = {}
    if cfg.profile_dir is not None and (world is None or world.is_coordinator):
        state, profiled = _profiled_steps(
            step_fn, state, [random_batch(), random_batch()], device, cfg.profile_dir
        )
    tracked = {}
    if cfg.track_memory:
        state, tracked = _tracked_step(step_fn, state, random_batch(), device)
    if world is not None:
        world.barrier()
        dist.destroy_process_group()
    tokens_per_s = batch_rows * dp * cfg.seq_len / step_s
    flops = flops_per_token(cfg.model, cfg.seq_len)
    peak = _peak_flops(cfg, device, dtype)
    return {
        "preset": cfg.preset,
        "params": count_params(cfg.model),
        "active_params": active_params(cfg.model),
        **_moe_figures(cfg.model, metrics, dtype, device),
        "seq_len": cfg.seq_len,
        "micro_batch_size": cfg.micro_batch_size,
        "grad_accum": cfg.grad_accum,
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": None if peak is None else round(tokens_per_s * flops / peak, 6),
        "flops_per_token": flops,
        "flop_formula": FLOP_FORMULA,
        "peak_tflops": None if peak is None else peak / 1e12,
        "peak_mem_gib": round(_peak_mem_gib(device), 3),
        "first_step_s": round(first_step_s, 3),
        "step_s": round(step_s, 6),
        "final_loss": round(float(metrics["loss"]), 4),
        **tracked,
        **profiled,
        **checkpoint_figures,
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "compile": "step" if cfg.compile == "step" else compiled,
        "ac": cfg.ac if cfg.ac != "budget" else f"budget {cfg.ac_budget:g}",
        "loss_chunk_tokens": settings.loss_chunk_tokens,
        "fp8": None if cfg.fp8 == "none" else cfg.fp8 + (" (emulated)" if settings.fp8_emulate else ""),
        "processes": world.size if world is not None else 1,
        "mesh": str(world.shape) if world is not None else None,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
