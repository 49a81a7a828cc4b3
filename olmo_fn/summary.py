"""What `train` prints when it ends: where the run stands, and the commands that use it next."""

from __future__ import annotations

import shlex
from pathlib import Path

from olmo_fn.errors import CheckpointError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.io.metrics_log import readable_records


def _last_rows(metrics: Path) -> tuple[dict | None, dict | None]:
    """(last step record, last record with an evaluation) of a metrics.jsonl (torn lines skipped)."""
    last = last_eval = None
    for row in readable_records(metrics):
        if "step" in row:
            last = row
            if any(k.startswith("eval/") for k in row):
                last_eval = row
    return last, last_eval


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}h {minutes:02d}m {secs:02d}s"
        if hours
        else f"{minutes}m {secs:02d}s"
        if minutes
        else f"{secs}s"
    )


def finished_summary(run_dir: Path, elapsed_s: float, model: ModelConfig | None = None) -> str:
    """Final step and loss, the latest evaluation, the time taken, and the next commands (`convert
    to-hf` only where transformers has the `model`'s architecture)."""
    last, last_eval = _last_rows(run_dir / "metrics.jsonl")
    lines = [f"run directory: {run_dir}"]
    if last is not None:
        status = f"step {last['step']}: loss {last['loss']:.4f}"
        if last_eval is not None:
            for key in sorted(k for k in last_eval if k.startswith("eval/") and k.endswith("/loss")):
                name = key.removesuffix("/loss")
                bpb = last_eval.get(f"{name}/bpb")
                status += f", {name} loss {last_eval[key]:.4f}" + (f" ({bpb:.3f} bits/byte)" if bpb else "")
            if last_eval["step"] != last["step"]:
                status += f" at step {last_eval['step']}"
        lines.append(f"{status}; this command took {_duration(elapsed_s)}")
    run, hf = shlex.quote(str(run_dir)), shlex.quote(f"{run_dir}-hf")
    lines += [
        "next:",
        f"  python -m olmo_fn.run generate --checkpoint {run} --prompt 'def '   # sample from it",
    ]
    if model is None or _has_hf_equivalent(model):
        lines.append(f"  python -m olmo_fn.run convert to-hf {run} {hf}   # for transformers")
    lines.append(f"  python -m olmo_fn.run checkpoint info {run}   # what its checkpoints hold")
    return "\n".join(lines)


def _has_hf_equivalent(model: ModelConfig) -> bool:
    from olmo_fn.io.hf_mapping import arch_for

    try:
        arch_for(model)
    except CheckpointError:
        return False
    return True
