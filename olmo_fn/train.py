"""The training loop: data -> `train_step` -> metrics.jsonl, progress, and a final checkpoint."""

from __future__ import annotations

import math
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson

from olmo_fn.config import TrainConfig, config_fingerprint, config_to_dict
from olmo_fn.errors import ConfigError, OlmoFnError
from olmo_fn.graph.flops import count_params
from olmo_fn.io.loader import open_training_data
from olmo_fn.io.metrics_log import MetricsLog
from olmo_fn.progress import StepProgress
from olmo_fn.runtime import device_name, resolve_compile, resolve_device, resolve_dtype
from olmo_fn.state.checkpoint import save_checkpoint
from olmo_fn.state.train_state import init_train_state
from olmo_fn.state.train_step import StepSettings, make_train_step


class TrainingError(OlmoFnError, RuntimeError):
    """Training cannot go on (e.g. the loss is no longer finite)."""


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(path: Path) -> Path:
    """Create the run directory; refuse one that already holds a run."""
    if (path / "config.json").exists():
        raise ConfigError(
            f"run_dir={str(path)!r} already holds a run (config.json); choose another --run-dir"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Run training as configured; returns the run directory."""
    device = resolve_device(cfg.device)
    data = open_training_data(cfg.data, cfg.model.vocab_size)
    run_dir = prepare_run_dir(Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg))
    config_json = config_to_dict(cfg)
    (run_dir / "config.json").write_bytes(orjson.dumps(config_json, option=orjson.OPT_INDENT_2))

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
        compile=resolve_compile(cfg.compile, device),
    )
    step_fn = make_train_step(settings)
    state = init_train_state(
        cfg.model, seed=cfg.seed, device=device, config_fingerprint=config_fingerprint(cfg)
    )
    if progress:
        print(
            f"{cfg.preset}: {count_params(cfg.model) / 1e6:,.2f}M params, {len(data.chunks):,} instances "
            f"of {cfg.data.seq_len} tokens, {cfg.steps} steps x "
            f"{cfg.global_batch_size * cfg.data.seq_len:,} tokens "
            f"on {device_name(device)}, {str(settings.compute_dtype).removeprefix('torch.')}"
            f"{', compiled' if settings.compile else ''} -> {run_dir}",
            file=sys.stderr,
        )

    # On an asynchronous device, step k's metrics are read only after step k+1 is queued, so the
    # device never idles while the host waits; the time between reads is then one step's time.
    lag = 1 if device.type == "cuda" else 0
    pending: list[tuple[int, dict, int, int]] = []
    last_read = time.perf_counter()
    with MetricsLog(run_dir / "metrics.jsonl") as log, StepProgress(cfg.steps, enabled=progress) as bar:

        def record(step: int, metrics: dict, n_tokens: int, tokens_seen: int) -> None:
            nonlocal last_read
            values = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}
            now = time.perf_counter()
            row = {
                "step": step,
                **values,
                "tokens_per_s": n_tokens / (now - last_read),
                "tokens_seen": tokens_seen,
            }
            last_read = now
            log.write(row)
            bar.update(step, row["loss"], row["tokens_per_s"])
            if not math.isfinite(row["loss"]):
                raise TrainingError(
                    f"loss is {row['loss']} at step {step} (lr {row['lr']:.3g}, "
                    f"grad norm {row['grad_norm']:.3g}); metrics so far are in {log.path}"
                )

        while state.step < cfg.steps:
            batch = data.batch(state.data_cursor, cfg.global_batch_size, seed=cfg.seed).to(device)
            state, metrics = step_fn(state, batch)
            pending.append((state.step, metrics, batch.n_tokens, state.tokens_seen))
            while len(pending) > lag:
                record(*pending.pop(0))
        while pending:
            record(*pending.pop(0))

    save_checkpoint(run_dir / "checkpoints" / f"step{state.step}", state, config_json)
    return run_dir
