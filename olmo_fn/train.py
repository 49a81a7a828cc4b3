"""The training loop: data -> `train_step` -> metrics.jsonl and checkpoints, fresh or resumed."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from olmo_fn.callbacks import check_logging_options, memory_metrics, state_view
from olmo_fn.callbacks.build import build_observers
from olmo_fn.config import (
    TrainConfig,
    config_fingerprint,
    config_from_dict,
    config_to_dict,
    math_differences,
)
from olmo_fn.errors import ConfigError, OlmoFnError
from olmo_fn.evaluate import eval_loss_sums, evaluate, open_eval_data
from olmo_fn.graph.flops import params_text
from olmo_fn.in_loop_downstream import downstream_metrics, open_loop_tasks
from olmo_fn.init_from import recorded_init_from, state_from_source
from olmo_fn.io.atomic import write_json
from olmo_fn.io.loader import Prefetcher, TrainingData, open_training_data
from olmo_fn.io.metrics_log import truncate_metrics
from olmo_fn.io.text_tokenizer import open_tokenizer_json
from olmo_fn.parallelize.mesh import launched_world
from olmo_fn.parallelize.world import World, start_world
from olmo_fn.run_dir import TOKENIZER, RunStart, check_run_dir_writable, inspect_run_dir, keep_tokenizer
from olmo_fn.runtime import (
    CpuThreads,
    choose_cpu_threads,
    device_name,
    fp8_emulated,
    resolve_device,
    resolve_dtype,
    resolve_loss_chunk,
    run_compiles,
)
from olmo_fn.state.checkpoint import checkpoint_path, load_checkpoint, remove_incomplete
from olmo_fn.state.checkpoint_writer import CheckpointWriter
from olmo_fn.state.moe_terms import moe_compile_problem
from olmo_fn.state.optim import init_opt_state
from olmo_fn.state.train_state import TrainState, current_versions, empty_train_state, init_train_state
from olmo_fn.state.train_step import StepSettings, execution_text, make_train_step


class TrainingError(OlmoFnError, RuntimeError):
    """Training cannot go on (e.g. the loss is no longer finite)."""


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def start_state(
    cfg: TrainConfig, run_dir: Path, device: torch.device, data: TrainingData, world: World | None = None
) -> tuple[TrainState, RunStart, list[str]]:
    """The state a train command starts from, decided and checked before anything is written:
    ``(state, how it starts, config differences accepted on resume)``.

    A fresh state for a new run directory (or one whose earlier attempt failed before its first
    update; with ``cfg.init_from``, the source's weights at step 0), or the newest checkpoint of an
    existing run (``cfg.init_from`` is then not read); every refusal (see `olmo_fn.run_dir`)
    raises before the directory changes. The first batch is built here too, so data that cannot
    train (e.g. a token id outside the vocabulary) is named before a file is written. With a `world`,
    the state is placed by its plan (a checkpoint of any world size and plan is resharded on load).
    """
    place = world.place if world is not None else (lambda state: state)
    config_json, fingerprint = config_to_dict(cfg), config_fingerprint(cfg)
    start = inspect_run_dir(run_dir, resume_required=cfg.resume)
    differences: list[str] = []
    if start.kind == "resume":
        saved = start.manifest["config"]
        with contextlib.suppress(ConfigError):  # else compared as written: every difference is listed
            saved = config_to_dict(config_from_dict(TrainConfig, saved, where="config"))  # fills new fields
        differences = math_differences(saved, config_json)
        if differences and not cfg.allow_config_change:
            raise ConfigError(
                f"{start.checkpoint}: the config differs from the checkpoint's in fields that change the "
                f"training math: {'; '.join(differences)}. Resume without those options, or pass "
                "--allow-config-change to continue with the new values (e.g. a new schedule for annealing)"
            )
        state = resume_state(cfg, start, saved, place, device)
    elif cfg.init_from is not None:  # a new run from a source's weights; never on resume
        state = place(
            state_from_source(cfg, device=device, config=config_json, config_fingerprint=fingerprint)
        )
    else:
        state = place(
            init_train_state(
                cfg.model,
                seed=cfg.seed,
                device=device,
                config=config_json,
                config_fingerprint=fingerprint,
                optim=cfg.optim,
            )
        )
    if cfg.schedule.start_step > state.step:
        raise ConfigError(
            f"schedule.start_step={cfg.schedule.start_step} is after step {state.step}, where this run "
            f"{'resumes' if state.step else 'starts'}; the schedule must start at or before it"
            + (f" (to anneal from here: --schedule.start-step {state.step})" if state.step else "")
        )
    if state.step < cfg.steps:
        data.batch(state.data_cursor, cfg.global_batch_size, **_data_share(world))  # DataError if unusable
    return state, start, differences


def resume_state(cfg: TrainConfig, start: RunStart, saved: dict, place, device: torch.device) -> TrainState:
    """The newest checkpoint of the run, loaded into a template of its own optimizer's state layout
    (as its config names it). When the run now asks for another optimizer (accepted on resume only
    with --allow-config-change), the parameters carry over and the new optimizer's state starts at zero.
    """
    saved_optim = dataclasses.replace(cfg.optim, name=saved.get("optim", {}).get("name", "adamw"))
    template = empty_train_state(cfg.model, device=device, optim=saved_optim)
    state = load_checkpoint(start.checkpoint, place(template))
    if saved_optim.name == cfg.optim.name:
        return state
    return dataclasses.replace(state, opt_state=init_opt_state(state.params, cfg.optim))


def _prepare_run_dir(
    cfg: TrainConfig, run_dir: Path, state: TrainState, start: RunStart, differences: list[str], verbose: bool
) -> None:
    """Write what the run starts with: the directory, config.json, the tokenizer copy; on resume, drop
    what the interrupted attempt wrote after its checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_incomplete(run_dir)
    if start.kind == "afresh":
        truncate_metrics(run_dir / "metrics.jsonl", 0)
        _say(
            verbose,
            f"starting {run_dir} afresh: it holds no checkpoint and no completed step "
            "(an earlier attempt stopped before its first update)",
        )
    if start.kind != "resume" and cfg.init_from is not None:
        _say(verbose, f"starting from the weights of {cfg.init_from} (step 0, zero optimizer state)")
    if start.kind == "resume":
        dropped = truncate_metrics(run_dir / "metrics.jsonl", state.step)
        _say(verbose, f"resuming {run_dir} from step {state.step} ({start.checkpoint.name})")
        if dropped:
            _say(verbose, f"  dropped {dropped} metrics record(s) written after that checkpoint")
        if differences:
            _say(verbose, "  with config changes: " + "; ".join(differences))
        if dict(state.versions) != current_versions():
            _say(
                verbose,
                f"  checkpoint written by {dict(state.versions)}, continuing with {current_versions()}",
            )
    keep_tokenizer(run_dir, cfg.data.tokenizer)
    write_json(run_dir / "config.json", config_to_dict(cfg))


def _with_run_tokenizer(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """`cfg` reading the run's own tokenizer copy when the configured file is not found from here
    (a relative path given in another directory, or a file since moved)."""
    tokenizer = cfg.data.tokenizer
    if tokenizer == "bytes" or Path(tokenizer).is_file() or not (run_dir / TOKENIZER).is_file():
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(run_dir / TOKENIZER)))


def _device_text(device: torch.device, threads: CpuThreads | None) -> str:
    if threads is None:
        return device_name(device)
    return f"cpu ({threads.threads} thread{'s' if threads.threads != 1 else ''}: {threads.reason})"


def _data_share(world: World | None) -> dict[str, int]:
    """Which rows of each global batch this process reads: its data-parallel rank among all of them."""
    if world is None:
        return {}
    return {"rank": world.sharding.layout.dp_rank, "world": world.shape.dp}


def metrics_lag(device: torch.device) -> int:
    """Steps by which metrics are read behind the step that made them (1 on CUDA, 0 elsewhere)."""
    return 1 if device.type == "cuda" else 0


def train(cfg: TrainConfig, *, progress: bool = True, observers: Sequence[object] = ()) -> Path:
    """Run training as configured (resuming when run_dir holds a run); returns the run directory.

    Everything that can be checked is checked before the run directory is touched: the config, the
    directory itself, the data (files, the first batch's token range), the eval set and tokenizer.

    Under a launcher (torchrun) every process calls this; each reads its data-parallel share of every
    batch and writes its checkpoint shards, and rank 0 alone writes config.json, metrics.jsonl and the
    progress line.

    `observers` watch the run's records, evaluations, checkpoints and end on rank 0, after the
    built-in ones (see `olmo_fn.callbacks.observer`); they cannot change the training.
    """
    device = resolve_device(cfg.device)
    if cfg.resume and cfg.run_dir is None:
        raise ConfigError("--resume needs --run-dir: the run directory to resume")
    compiled = run_compiles(cfg, device)
    if cfg.compile == "step" and launched_world()[1] > 1:
        raise ConfigError("compile=step runs in one process; under torchrun use compile=on")
    moe_problem = moe_compile_problem(cfg.model, resolve_dtype(cfg.dtype, device)) if compiled else None
    if moe_problem:
        raise ConfigError(moe_problem)
    if cfg.parallel.pp > 1 and cfg.parallel.pp_schedule == "zbv" and cfg.eval.interval:
        raise ConfigError(
            "evaluation under parallel.pp_schedule=zbv is not supported (its V-shaped stages have no "
            "forward-only schedule in torch): pass --eval.interval 0, or choose interleaved-zb"
        )
    check_logging_options(cfg.log, cfg.profile, cfg.steps)
    world, device = start_world(
        cfg.parallel,
        cfg.model,
        device,
        resolve_dtype(cfg.dtype, device),
        global_batch=cfg.global_batch_size,
        micro_batch=cfg.micro_batch,
        seq_len=cfg.data.seq_len,
    )
    # A rank that fails leaves its group as it is: the launcher, or the others' collective timeout,
    # ends the rest. Only a run that finished everywhere tears the group down.
    coordinator = world is None or world.is_coordinator
    run_dir = _train(
        cfg, device, world, compiled=compiled, progress=progress and coordinator, observers=observers
    )
    if world is not None:
        world.barrier()
        dist.destroy_process_group()
    return run_dir


def _train(
    cfg: TrainConfig,
    device: torch.device,
    world: World | None,
    *,
    compiled: bool,
    progress: bool,
    observers: Sequence[object] = (),
) -> Path:
    coordinator = world is None or world.is_coordinator
    threads = None
    if device.type == "cpu":
        threads = choose_cpu_threads(cfg.threads)
        torch.set_num_threads(threads.threads)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    if world is not None:
        run_dir = world.broadcast(run_dir)  # rank 0's clock names a default run directory
    check_run_dir_writable(run_dir)
    cfg = _with_run_tokenizer(cfg, run_dir)
    if cfg.data.tokenizer != "bytes":
        open_tokenizer_json(cfg.data.tokenizer, f"data.tokenizer={cfg.data.tokenizer}")
    total_instances = cfg.steps * cfg.global_batch_size
    data = open_training_data(cfg.data, cfg.model.vocab_size, seed=cfg.seed, total_instances=total_instances)
    eval_data = open_eval_data(cfg.eval, cfg.data, cfg.model.vocab_size)
    loop_tasks = open_loop_tasks(cfg)  # downstream tasks, read and checked once
    state, start, differences = start_state(cfg, run_dir, device, data, world)
    cfg = recorded_init_from(cfg, start.manifest["config"] if start.kind == "resume" else None)
    if coordinator:
        _prepare_run_dir(cfg, run_dir, state, start, differences, progress)
    # From here the state carries this command's config and software (a resumed one, the checkpoint's).
    state = dataclasses.replace(
        state,
        config=config_to_dict(cfg),
        config_fingerprint=config_fingerprint(cfg),
        versions=current_versions(),
    )
    if world is not None:
        world.barrier()  # the run directory is ready before any rank writes checkpoint shards into it
    if state.step >= cfg.steps:
        _say(progress, f"{run_dir}: already trained for {state.step} of {cfg.steps} steps; nothing to do")
        return run_dir

    settings = StepSettings(
        model=cfg.model,
        optim=cfg.optim,
        schedule=cfg.schedule,
        total_steps=cfg.steps,
        micro_batch_size=cfg.micro_batch,
        compute_dtype=resolve_dtype(cfg.dtype, device),
        z_loss=cfg.z_loss,
        max_grad_norm=cfg.max_grad_norm,
        attention_backend=cfg.attention_backend,
        document_masking=cfg.document_masking,
        compile=compiled,
        ac=cfg.ac,
        ac_budget=cfg.ac_budget,
        loss_chunk_tokens=resolve_loss_chunk(
            cfg.loss_chunk_tokens, cfg.micro_batch * cfg.data.seq_len, cfg.model.vocab_size
        ),
        fp8=cfg.fp8,
        fp8_emulate=fp8_emulated(device),
        compile_step=cfg.compile == "step",
        spike=cfg.spike,
    )
    sharding = world.sharding if world is not None else None
    step_fn = make_train_step(settings, sharding)
    where = _device_text(device, threads)
    if world is not None:
        where = f"{world.size} processes ({world.shape}) on {where}"
    _say(
        progress,
        f"{cfg.preset}: {params_text(cfg.model)}, {len(data):,} instances "
        f"of {cfg.data.seq_len} tokens, {cfg.steps} steps x {cfg.global_batch_size * cfg.data.seq_len:,} "
        f"tokens on {where}, {str(settings.compute_dtype).removeprefix('torch.')}"
        f"{', compiled' if settings.compile else ''}{execution_text(settings)} -> {run_dir}",
    )

    # On an asynchronous device, step k's metrics are read only after step k+1 is queued, so the
    # device never idles while the host waits; the time between reads is then one step's time.
    lag = metrics_lag(device)
    dp = world.shape.dp if world is not None else 1
    share = _data_share(world)
    pending: list[dict] = []
    last_read = time.perf_counter()
    # Async saves of several processes talk over a group of their own, beside the training's.
    save_group = dist.new_group(backend="gloo") if world is not None and cfg.checkpoint.async_save else None
    # metrics.jsonl, the progress line, W&B, TensorBoard (rank 0), the profiler, the caller's observers;
    # the group is left last, so their on_end comes after the last checkpoint is complete.
    observer_group, profiler = build_observers(
        log=cfg.log,
        profile=cfg.profile,
        run_dir=run_dir,
        device=device,
        total_steps=cfg.steps,
        start_step=state.step,
        config=config_to_dict(cfg),
        coordinator=coordinator,
        rank=world.rank if world is not None else None,
        progress=progress,
        extra=observers,
    )
    evaluating = eval_data is not None or loop_tasks is not None
    eval_sums = eval_loss_sums(settings, sharding) if eval_data is not None else None  # one per run
    if profiler is not None:
        step_fn = profiler.wrap(step_fn)
    with (
        observer_group,
        CheckpointWriter(run_dir, cfg.checkpoint, group=save_group) as checkpoints,
        Prefetcher(
            lambda cursor: data.batch(cursor, cfg.global_batch_size, **share),
            state.data_cursor,
            cfg.global_batch_size,
            pin=device.type == "cuda",
        ) as batches,
    ):

        def record(row: dict) -> None:
            nonlocal last_read
            row = {k: _plain(v) for k, v in row.items()}
            now = time.perf_counter()
            row["tokens_per_s"] = row.pop("n_tokens") / (now - last_read - row.get("eval_s", 0.0))
            last_read = now
            row.update(memory_metrics(device))
            observer_group.record(state_view(row["step"], row["tokens_seen"], state), row)
            if not math.isfinite(row["loss"]):
                raise TrainingError(
                    f"loss is {row['loss']} at step {row['step']} (lr {row['lr']:.3g}, "
                    f"grad norm {row['grad_norm']:.3g}); metrics so far are in {run_dir / 'metrics.jsonl'}"
                )

        while state.step < cfg.steps:
            waited = batches.wait_s
            cursor, batch = batches.next()
            assert cursor == state.data_cursor, (cursor, state.data_cursor)
            state, metrics = step_fn(state, batch.to(device))
            row = {
                "step": state.step,
                **metrics,
                "n_tokens": batch.n_tokens * dp,
                "tokens_seen": state.tokens_seen,
            }
            row["data_wait_s"] = batches.wait_s - waited
            if evaluating and (state.step % cfg.eval.interval == 0 or state.step == cfg.steps):
                started = time.perf_counter()
                if eval_data is not None:
                    row.update(
                        evaluate(state.params, eval_data, settings, device, sharding, loss_sums=eval_sums)
                    )
                if loop_tasks is not None:
                    scored = time.perf_counter()
                    row.update(downstream_metrics(state.params, loop_tasks, cfg.model, device))
                    row["downstream_s"] = time.perf_counter() - scored
                row["eval_s"] = time.perf_counter() - started
            pending.append(row)
            while len(pending) > lag:
                record(pending.pop(0))
            if checkpoints.due(state.step, cfg.steps):
                while pending:  # a checkpoint never lands before the metrics of the steps it holds
                    record(pending.pop(0))
                checkpoints.save(state)
                observer_group.checkpoint(state.step, checkpoint_path(run_dir, state.step))
        while pending:
            record(pending.pop(0))
    return run_dir


def _plain(value: Any) -> Any:
    """A metric as JSON takes it: a tensor's number, or its list (an MoE layer's tokens per expert)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value.item() if hasattr(value, "item") else value
