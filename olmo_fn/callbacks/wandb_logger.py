"""Weights & Biases as an observer (the wandb extra): every metrics.jsonl record, at its step.

The W&B run id is kept in RUN_DIR/wandb_id.txt, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from olmo_fn.callbacks.config import LogConfig, require_module
from olmo_fn.callbacks.observer import Observer, StateView

RUN_ID_FILE = "wandb_id.txt"


class WandbObserver(Observer):
    name = "wandb"

    def __init__(self, cfg: LogConfig, run_dir: str | Path, config: dict[str, Any]):
        wandb = require_module("wandb", "--log.wandb", "wandb")
        run_dir = Path(run_dir)
        directory = Path(cfg.wandb_dir) if cfg.wandb_dir else run_dir
        directory.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = wandb.init(
            project=cfg.wandb_project,
            name=cfg.wandb_name or run_dir.name,
            dir=str(directory),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        if run_id is None:
            id_file.write_text(self.run.id + "\n")

    def on_step(self, view: StateView, metrics: dict[str, Any]) -> None:
        step = metrics.pop("step")
        # numbers only, as TensorBoard: lists (an MoE layer's tokens per expert) stay in metrics.jsonl
        self.run.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.run.summary["last_checkpoint"] = str(path)

    def on_end(self, summary: dict[str, Any]) -> None:
        self.run.finish(exit_code=0 if summary["finished"] else 1)
