"""``ladder``: train a ladder of small models on the embedded corpus, fit a scaling law to their losses and
predict a larger model.

A rung is an OLMo 2 block stack on the byte vocabulary (the olmo2-tiny preset with its width and depth
changed), named ``D_MODELxN_LAYERS``: ``d_model / head_dim`` heads (as many key/value heads) and an MLP
``mlp_ratio`` times as wide. Each rung trains on ``tokens_per_param × N`` tokens (rounded to whole steps)
as a normal run directory ``OUT/SIZE-tppMULT/``: re-running the command skips finished rungs and resumes
unfinished ones from their newest checkpoint; a rung directory made with other settings is refused.

- N, the model size, counts the non-embedding parameters: the transformer blocks and the final norm,
  without the two vocabulary matrices (embedding table and LM-head output), as Kaplan et al. count it.
- The rung's loss is its final evaluation loss: mean cross-entropy (nats per byte token) on the first
  ``eval_instances`` held-out instances of the embedded corpus, after the last step. The same tokens for
  every rung, and unaffected by the noise of single training batches.
- The fit is L(N) = E + A·N^-alpha (`fit_power_law`) with one token multiple, L(N, D) = E + A·N^-alpha +
  B·D^-beta (`fit_chinchilla`) with several. With ``held_out`` the largest size is left out of the fit and
  predicted: that error is the honest measure of how well the fit extrapolates.

Writes ``OUT/ladder.md`` (rungs, fit table, formula, held-out error, target prediction) and
``OUT/ladder.png`` (`plot_fit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import shlex
import sys
import time
from pathlib import Path

from olmo_fn.config import TrainConfig, config_from_dict, config_to_dict, math_differences
from olmo_fn.errors import ConfigError
from olmo_fn.evaluate import EvalConfig
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import param_shapes
from olmo_fn.graph.presets import PRESETS
from olmo_fn.io.loader import DataConfig
from olmo_fn.io.metrics_log import readable_records
from olmo_fn.run_dir import inspect_run_dir
from olmo_fn.scaling_law import (
    EXPONENT_RANGE,
    ChinchillaFit,
    PowerLawFit,
    fit_chinchilla,
    fit_power_law,
    fit_table,
    plot_fit,
)
from olmo_fn.state.schedule import ScheduleConfig

BASE_PRESET = "olmo2-tiny"
"""Rungs are this preset (byte vocabulary, OLMo 2 block) with another width and depth."""
SIZE = re.compile(r"(\d+)x(\d+)")
LOSS_KEY = "eval/val/loss"
VOCABULARY_MATRICES = ("embeddings", "lm_head.w_out")


def parse_size(size: str) -> tuple[int, int]:
    """``"D_MODELxN_LAYERS"`` -> (d_model, n_layers); ConfigError otherwise."""
    match = SIZE.fullmatch(size.strip())
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ConfigError(f"ladder: size {size!r} is not D_MODELxN_LAYERS (e.g. 64x2)")
    return int(match[1]), int(match[2])


def size_model(size: str, head_dim: int, mlp_ratio: float) -> ModelConfig:
    """The model of a rung named ``D_MODELxN_LAYERS``."""
    d_model, n_layers = parse_size(size)
    if d_model % head_dim:
        raise ConfigError(f"ladder: size {size}: d_model {d_model} is not a multiple of head_dim={head_dim}")
    heads = d_model // head_dim
    return dataclasses.replace(
        PRESETS[BASE_PRESET],
        d_model=d_model,
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=heads,
        mlp_hidden=max(1, round(mlp_ratio * d_model)),
    )


def target_model(target: str, head_dim: int, mlp_ratio: float) -> ModelConfig:
    """A preset by name, or a ``D_MODELxN_LAYERS`` size."""
    if target in PRESETS:
        return PRESETS[target]
    if SIZE.fullmatch(target.strip()):
        return size_model(target, head_dim, mlp_ratio)
    raise ConfigError(f"ladder: target {target!r} is neither a preset name nor D_MODELxN_LAYERS (e.g. 256x4)")


def non_embedding_params(model: ModelConfig) -> int:
    """Every parameter but the embedding table and the LM head's output matrix."""
    return sum(math.prod(s) for path, s in param_shapes(model).items() if path not in VOCABULARY_MATRICES)


@dataclasses.dataclass(frozen=True)
class LadderConfig:
    """Train a ladder of small models, fit a scaling law to their final losses and predict a bigger one.

    L(N) = E + A·N^-alpha over N, the non-embedding parameters, on the embedded corpus; the largest rung
    is held out of the fit to measure the prediction error. Re-running skips finished rungs."""

    sizes: tuple[str, ...] = ("32x2", "48x2", "64x2", "96x2")
    """Rungs as D_MODELxN_LAYERS (OLMo 2 blocks on the byte vocabulary), at least 3 (4 with held_out)."""
    tokens_per_param: tuple[float, ...] = (20.0,)
    """Training tokens per non-embedding parameter; with several multiples every size trains at each and
    L(N, D) = E + A·N^-alpha + B·D^-beta is fitted instead."""
    head_dim: int = 16
    """Width of an attention head: a rung has d_model / head_dim heads."""
    mlp_ratio: float = 3.0
    """MLP hidden width over d_model (olmo2-tiny's 384 / 128)."""
    seq_len: int = 256
    """Tokens per instance."""
    global_batch_size: int = 16
    """Instances per optimizer step."""
    warmup_fraction: float = 0.1
    """Learning-rate warmup as a share of each rung's steps (then cosine decay to the end)."""
    eval_instances: int = 64
    """Held-out instances of seq_len tokens the final loss of every rung is measured on."""
    held_out: bool = True
    """Leave the largest size out of the fit and report how well the fit predicts it."""
    target: str | None = BASE_PRESET
    """A bigger model to predict the loss of: a preset name or D_MODELxN_LAYERS; None: none."""
    out: Path = Path("runs/ladder")
    """Directory of the rung run directories, ladder.md and ladder.png."""
    seed: int = 0
    """Seeds every rung's init and data order."""
    threads: int | None = None
    """Intra-op CPU threads (None: chosen from the idle cores, as for train)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        problems = []
        for name in ("head_dim", "seq_len", "global_batch_size", "eval_instances"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio={self.mlp_ratio} must be > 0")
        if not 0 <= self.warmup_fraction <= 1:
            problems.append(f"warmup_fraction={self.warmup_fraction} must be in [0, 1]")
        if not self.tokens_per_param or not all(0 < m < math.inf for m in self.tokens_per_param):
            problems.append(f"tokens_per_param={self.tokens_per_param} must be one or more numbers > 0")
        elif len(set(self.tokens_per_param)) != len(self.tokens_per_param):
            problems.append(f"tokens_per_param={self.tokens_per_param} repeats a multiple")
        if problems:
            raise ConfigError("invalid ladder config: " + "; ".join(problems))
        counts = [non_embedding_params(size_model(s, self.head_dim, self.mlp_ratio)) for s in self.sizes]
        if len(set(counts)) != len(counts):
            raise ConfigError(f"ladder: sizes {', '.join(self.sizes)} repeat a model size N {counts}")
        needed = 3 + self.held_out
        if len(self.sizes) < needed:
            raise ConfigError(
                f"ladder: sizes holds {len(self.sizes)} rung(s); the fit needs at least 3 sizes"
                + (" plus the held-out largest one" if self.held_out else "")
            )
        if self.target is not None:
            target_model(self.target, self.head_dim, self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class Rung:
    """One run of the ladder."""

    size: str
    multiple: float
    model: ModelConfig
    n: int
    """Non-embedding parameters."""
    steps: int
    tokens: int
    """Training tokens: steps × global_batch_size × seq_len."""
    held_out: bool

    @property
    def name(self) -> str:
        return f"{self.size}-tpp{self.multiple:g}"


def steps_for(cfg: LadderConfig, multiple: float, n: int) -> int:
    """Steps that train a model of `n` non-embedding parameters on `multiple` · n tokens (at least 1)."""
    return max(1, round(multiple * n / (cfg.global_batch_size * cfg.seq_len)))


def warmup_for(cfg: LadderConfig, steps: int) -> int:
    """Warmup steps of a run of `steps`: ``warmup_fraction`` of them, at least 1."""
    return max(1, round(cfg.warmup_fraction * steps))


def plan_rungs(cfg: LadderConfig) -> list[Rung]:
    """Every rung, smallest N first (the held-out largest ones last)."""
    per_step = cfg.global_batch_size * cfg.seq_len
    rungs = []
    largest = max(non_embedding_params(size_model(s, cfg.head_dim, cfg.mlp_ratio)) for s in cfg.sizes)
    for size in cfg.sizes:
        model = size_model(size, cfg.head_dim, cfg.mlp_ratio)
        n = non_embedding_params(model)
        for multiple in cfg.tokens_per_param:
            steps = steps_for(cfg, multiple, n)
            rungs.append(
                Rung(size, multiple, model, n, steps, steps * per_step, cfg.held_out and n == largest)
            )
    return sorted(rungs, key=lambda r: (r.n, r.multiple))


def rung_config(cfg: LadderConfig, rung: Rung) -> TrainConfig:
    """The TrainConfig of one rung: evaluated once, after its last step, without downstream tasks."""
    return TrainConfig(
        model=rung.model,
        data=DataConfig(seq_len=cfg.seq_len),
        schedule=ScheduleConfig(warmup_steps=warmup_for(cfg, rung.steps)),
        steps=rung.steps,
        global_batch_size=cfg.global_batch_size,
        seed=cfg.seed,
        threads=cfg.threads,
        eval=EvalConfig(interval=rung.steps, max_instances=cfg.eval_instances, downstream=()),
        run_dir=str(cfg.out / rung.name),
    )


def final_loss(run_dir: Path, steps: int) -> float:
    """The eval loss a finished rung logged at its last step."""
    path = run_dir / "metrics.jsonl"
    loss = None
    for row in readable_records(path):
        if row.get("step") == steps and LOSS_KEY in row:
            loss = float(row[LOSS_KEY])
    if loss is None:
        raise ConfigError(f"{path}: no {LOSS_KEY} at step {steps}; remove {run_dir} to train that rung again")
    return loss


def finished(train_cfg: TrainConfig) -> bool:
    """Whether the rung's run directory holds its final checkpoint. ConfigError when the directory was
    trained with other settings (it would not be this rung), or cannot be resumed."""
    run_dir = Path(train_cfg.run_dir)
    if not run_dir.exists():
        return False
    start = inspect_run_dir(run_dir, resume_required=False)
    if start.kind != "resume":
        return False
    saved = start.manifest["config"]
    with contextlib.suppress(ConfigError):  # else compared as written: every difference is listed
        saved = config_to_dict(config_from_dict(TrainConfig, saved, where="config"))
    differences = math_differences(saved, config_to_dict(train_cfg))
    if differences:
        raise ConfigError(
            f"{run_dir}: trained with other settings than this ladder's ({'; '.join(differences)}); "
            "run the ladder with the settings it was made with, or choose another --out"
        )
    return start.manifest["step"] >= train_cfg.steps


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_rungs(cfg: LadderConfig, rungs: list[Rung], progress: bool) -> list[float]:
    """Train (or resume, or skip) every rung in order; the final loss of each."""
    from olmo_fn.train import train  # the training loop, only when a ladder runs

    losses = []
    for i, rung in enumerate(rungs, start=1):
        train_cfg = rung_config(cfg, rung)
        run_dir = Path(train_cfg.run_dir)
        _say(
            f"rung {i}/{len(rungs)} {rung.name}: N = {rung.n:,} non-embedding params, D = {rung.tokens:,} "
            f"tokens ({rung.steps} steps){', held out of the fit' if rung.held_out else ''} -> {run_dir}"
        )
        if finished(train_cfg):
            loss = final_loss(run_dir, rung.steps)
            _say(f"  finished earlier: eval loss {loss:.4f}")
        else:
            started = time.perf_counter()
            train(train_cfg, progress=progress)
            loss = final_loss(run_dir, rung.steps)
            _say(f"  eval loss {loss:.4f} ({time.perf_counter() - started:.0f} s)")
        losses.append(loss)
    return losses


@dataclasses.dataclass(frozen=True)
class LadderResult:
    """What `run_ladder` measured and fitted."""

    rungs: tuple[Rung, ...]
    losses: tuple[float, ...]
    fit: PowerLawFit | ChinchillaFit
    held_out_errors: tuple[float, ...]
    """loss - prediction of each held-out rung (nats), in rung order."""
    target_n: int | None
    target_prediction: float | None
    report: Path
    figure: Path


def _predict(fit: PowerLawFit | ChinchillaFit, n: float, d: float) -> float:
    return float(fit.predict(n) if isinstance(fit, PowerLawFit) else fit.predict(n, d))


def _points(fit: PowerLawFit | ChinchillaFit, rungs, losses) -> list[tuple[float, ...]]:
    if isinstance(fit, PowerLawFit):
        return [(r.n, loss) for r, loss in zip(rungs, losses, strict=True)]
    return [(r.n, r.tokens, loss) for r, loss in zip(rungs, losses, strict=True)]


def fit_ladder(cfg: LadderConfig, rungs: list[Rung], losses: list[float]) -> PowerLawFit | ChinchillaFit:
    """The scaling law fitted to the rungs that are not held out."""
    kept = [(r, loss) for r, loss in zip(rungs, losses, strict=True) if not r.held_out]
    n = [r.n for r, _ in kept]
    loss = [value for _, value in kept]
    if len(cfg.tokens_per_param) == 1:
        return fit_power_law(n, loss)
    return fit_chinchilla(n, [r.tokens for r, _ in kept], loss)


def fit_warnings(fit: PowerLawFit | ChinchillaFit) -> list[str]:
    """What makes a fit's extrapolation untrustworthy: an exponent at the edge of the searched range, or
    a negative irreducible loss E (the losses fall faster than a power law over these sizes)."""
    warnings = []
    exponents = {"alpha": fit.alpha} | ({"beta": fit.beta} if isinstance(fit, ChinchillaFit) else {})
    for name, value in exponents.items():
        if min(abs(value / bound - 1) for bound in EXPONENT_RANGE) < 1e-3:
            warnings.append(
                f"warning: {name} = {value:.4g} is at the edge of the range searched {EXPONENT_RANGE}: "
                "these losses do not follow a power law, so predictions from the fit are unreliable"
            )
    if fit.E < 0:
        warnings.append(
            f"warning: E = {fit.E:.4g} < 0: no loss can fall below 0, so the fit will not hold far out "
            "(train longer rungs: more --tokens-per-param, or a smaller --global-batch-size for more steps)"
        )
    return warnings


def rung_table(rungs: list[Rung], losses: list[float]) -> str:
    lines = [
        "| rung | d_model | layers | N (non-embedding) | D (tokens) | steps | final eval loss | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, loss in zip(rungs, losses, strict=True):
        lines.append(
            f"| {r.name} | {r.model.d_model} | {r.model.n_layers} | {r.n:,} | {r.tokens:,} | {r.steps} | "
            f"{loss:.4f} | {'held out' if r.held_out else 'fitted'} |"
        )
    return "\n".join(lines)


def target_command(cfg: LadderConfig, model: ModelConfig, n: int) -> str:
    """The train command for the target size at the ladder's first token multiple."""
    steps = steps_for(cfg, cfg.tokens_per_param[0], n)
    if cfg.target in PRESETS:
        shape = f"--preset {cfg.target}"
    else:
        shape = (
            f"--model.d-model {model.d_model} --model.n-layers {model.n_layers} --model.n-heads "
            f"{model.n_heads} --model.n-kv-heads {model.n_kv_heads} --model.mlp-hidden {model.mlp_hidden}"
        )
    warmup = warmup_for(cfg, steps)
    run_dir = shlex.quote(str(cfg.out / f"target-{cfg.target}"))
    return (
        f"python -m olmo_fn.run train {shape} --steps {steps} --global-batch-size {cfg.global_batch_size} "
        f"--data.seq-len {cfg.seq_len} --schedule.warmup-steps {warmup} --eval.interval {steps} "
        f"--eval.max-instances {cfg.eval_instances} --run-dir {run_dir}"
    )


def run_ladder(cfg: LadderConfig, *, progress: bool = True) -> LadderResult:
    """Train the rungs, fit, write OUT/ladder.md and OUT/ladder.png, print the summary and next steps."""
    rungs = plan_rungs(cfg)
    losses = train_rungs(cfg, rungs, progress)
    cfg.out.mkdir(parents=True, exist_ok=True)
    report = cfg.out / "ladder.md"
    lines = ["# Model ladder", "", rung_table(rungs, losses), ""]
    try:
        fit = fit_ladder(cfg, rungs, losses)
    except ConfigError as exc:
        report.write_text("\n".join([*lines, f"No fit: {exc}", ""]))
        raise ConfigError(f"ladder: {exc} (the rungs' losses are in {report})") from None
    held = [(r, loss) for r, loss in zip(rungs, losses, strict=True) if r.held_out]
    errors = tuple(loss - _predict(fit, r.n, r.tokens) for r, loss in held)
    model = target_model(cfg.target, cfg.head_dim, cfg.mlp_ratio) if cfg.target else None
    target_n = non_embedding_params(model) if model else None
    target_d = None
    if target_n is not None and isinstance(fit, ChinchillaFit):
        target_d = float(cfg.tokens_per_param[0] * target_n)
    prediction = _predict(fit, target_n, target_d) if target_n is not None else None
    points = _points(fit, rungs, losses)

    fitted = sum(not r.held_out for r in rungs)
    summary = [f"fit: {fit.formula()} over {fitted} rungs, rmse {fit.rmse:.4f}", *fit_warnings(fit)]
    for (r, loss), error in zip(held, errors, strict=True):
        summary.append(
            f"held out {r.name} (N = {r.n:,}): loss {loss:.4f}, predicted {loss - error:.4f}, "
            f"error {error:+.4f} ({100 * error / loss:+.2f} %)"
        )
    if prediction is not None:
        at = f", D = {target_d:,.0f} tokens" if target_d is not None else ""
        summary.append(f"target {cfg.target} (N = {target_n:,}{at}): predicted loss {prediction:.4f}")
    lines += [
        "## Fit",
        "",
        f"N: non-embedding parameters; D: training tokens; loss: final eval loss (nats per byte token) "
        f"on {cfg.eval_instances} held-out instances of {cfg.seq_len} tokens.",
        "",
        fit_table(fit, points, target_n, target_d),
        "",
        *(f"- {line}" for line in summary),
        "",
        "![fit](ladder.png)",
        "",
    ]
    report.write_text("\n".join(lines))
    figure = plot_fit(fit, points, cfg.out / "ladder.png", target_n, target_d)

    print(f"ladder: {len(rungs)} rungs in {cfg.out}")
    print("\n".join(summary))
    print(f"wrote {report} and {figure}")
    print("next:")
    if model is not None:
        print(f"  {target_command(cfg, model, target_n)}   # train the target; compare with the prediction")
    curves = shlex.quote(str(cfg.out / "curves.png"))
    print(f"  python -m olmo_fn.run plot {shlex.quote(str(cfg.out))}/*/ --out {curves}   # the rungs' curves")
    return LadderResult(
        rungs=tuple(rungs),
        losses=tuple(losses),
        fit=fit,
        held_out_errors=errors,
        target_n=target_n,
        target_prediction=prediction,
        report=report,
        figure=figure,
    )
