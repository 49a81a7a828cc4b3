"""`plot`: the metrics of one or more training runs as one PNG, a panel per metric, the runs overlaid.

matplotlib is optional (the `plot` extra); it is imported only when a figure is drawn, and drawn by
the Agg backend directly (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import tyro

from olmo_fn.errors import ConfigError
from olmo_fn.io.atomic import atomic_write
from olmo_fn.io.metrics_log import readable_records

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING_MATPLOTLIB = "plot needs matplotlib: pip install 'olmo_fn[plot]'"
DEFAULT_METRICS = ("loss", "eval/*/loss", "lr", "tokens_per_s", "downstream/*/acc")
X_KEYS = {"step": "step", "tokens": "tokens_seen"}
X_LABELS = {"step": "step", "tokens": "tokens seen"}
PANEL_INCHES = (6.0, 3.5)
"""Width and height of one panel; the figure is COLUMNS panels wide."""
COLUMNS = 2
DPI = 100
MARKER_MAX_POINTS = 40
"""Series with at most this many points get markers, so sparse ones (evaluations) stay visible."""


@dataclasses.dataclass(frozen=True)
class PlotConfig:
    """Draw the metrics of training runs into one PNG: a panel per metric, every run overlaid."""

    runs: tyro.conf.Positional[tuple[Path, ...]]
    """Run directories (each holding metrics.jsonl) or metrics.jsonl files."""
    out: Path
    """The PNG to write; an existing file is replaced atomically."""
    x: Literal["step", "tokens"] = "step"
    """X axis: the optimizer step, or the tokens seen (tokens_seen)."""
    metrics: tuple[str, ...] = DEFAULT_METRICS
    """Metric keys, a panel each; shell patterns (eval/*/loss) stand for every key they match.
    Keys found in no run are skipped."""
    smooth: int = 0
    """Trailing moving-average window for the training losses (loss, z_loss), drawn over the raw
    curve; 0 (or 1) draws them raw."""
    title: str | None = None
    """Figure title; none by default."""

    def __post_init__(self):
        object.__setattr__(self, "runs", tuple(Path(r) for r in self.runs))
        object.__setattr__(self, "out", Path(self.out))
        if not self.runs:
            raise ConfigError("plot: runs must not be empty: give run directories or metrics.jsonl files")
        if self.out.suffix.lower() != ".png":
            raise ConfigError(f"plot: out must end in .png, got {str(self.out)!r}")
        if self.x not in X_KEYS:
            raise ConfigError(f"plot: x must be one of {', '.join(X_KEYS)}, got {self.x!r}")
        if not self.metrics or not all(isinstance(m, str) and m for m in self.metrics):
            raise ConfigError(f"plot: metrics must be one or more non-empty keys, got {self.metrics!r}")
        if self.smooth < 0:
            raise ConfigError(f"plot: smooth must be >= 0 (0 = off), got {self.smooth}")


def metrics_path(run: Path) -> Path:
    """The metrics file of `run`: run/metrics.jsonl for a directory, else `run` itself."""
    return run / "metrics.jsonl" if run.is_dir() else run


def load_run(run: Path) -> list[dict[str, Any]]:
    """The records of a run by ascending step; where a resumed run repeated a step, the last record wins.

    Torn lines (a crash mid-write) and lines without an integer step are skipped. ConfigError, naming
    the file, if it is missing or holds no record.
    """
    path = metrics_path(Path(run))
    if not path.is_file():
        raise ConfigError(f"plot: {path}: no such metrics file (runs takes run directories or metrics.jsonl)")
    by_step = {r["step"]: r for r in readable_records(path) if type(r.get("step")) is int}
    if not by_step:
        raise ConfigError(f"plot: {path}: no metrics records in it")
    return [by_step[step] for step in sorted(by_step)]


def run_labels(runs: Sequence[Path]) -> list[str]:
    """Legend names: the run directory's name; the path as given where two runs share a name."""
    names = []
    for run in runs:
        path = Path(run)
        if path.is_dir():
            names.append(path.resolve().name)
        elif path.name == "metrics.jsonl":
            names.append(path.resolve().parent.name)
        else:
            names.append(path.stem)
    return [str(run) if names.count(name) > 1 else name for run, name in zip(runs, names, strict=True)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def series(records: Sequence[dict[str, Any]], x_key: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of `key` against `x_key` over the records that hold numbers for both."""
    pairs = [(r[x_key], r[key]) for r in records if _is_number(r.get(x_key)) and _is_number(r.get(key))]
    if not pairs:
        return np.empty(0), np.empty(0)
    xs, ys = zip(*pairs, strict=True)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def panel_keys(
    patterns: Sequence[str], runs: Sequence[Sequence[dict[str, Any]]], x_key: str
) -> tuple[list[str], list[str]]:
    """(keys to draw, in pattern order, each once; patterns that matched no plottable key in any run).

    A key is plottable where some record holds numbers for it and for `x_key`.
    """
    present: dict[str, None] = {}
    for records in runs:
        for record in records:
            if _is_number(record.get(x_key)):
                present.update((k, None) for k, v in record.items() if k != x_key and _is_number(v))
    keys: list[str] = []
    unmatched = []
    for pattern in patterns:
        hits = sorted(k for k in present if fnmatch.fnmatchcase(k, pattern))
        if not hits:
            unmatched.append(pattern)
        keys += [k for k in hits if k not in keys]
    return keys, unmatched


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the last `window` values at each point (fewer at the start); window <= 1: y as is."""
    y = np.asarray(y, dtype=float)
    if window <= 1 or y.size == 0:
        return y
    sums = np.concatenate([[0.0], np.cumsum(y)])
    end = np.arange(1, y.size + 1)
    start = np.maximum(end - window, 0)
    return (sums[end] - sums[start]) / (end - start)


def is_training_loss(key: str) -> bool:
    """The per-step losses `smooth` applies to: loss, z_loss (not eval/ or downstream/ keys)."""
    return "/" not in key and key.endswith("loss")


def new_figure(size_inches: tuple[float, float]) -> Figure:
    """An empty matplotlib Figure drawn by Agg at DPI; ConfigError if matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(MISSING_MATPLOTLIB) from None
    fig = Figure(figsize=size_inches, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, out: Path) -> Path:
    """Write `fig` as a PNG at DPI: to a temporary file beside `out`, then renamed over it."""
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _draw_panel(ax, key: str, runs: Sequence[tuple[str, list[dict]]], cfg: PlotConfig) -> None:
    x_key = X_KEYS[cfg.x]
    smooth = cfg.smooth > 1 and is_training_loss(key)
    for i, (label, records) in enumerate(runs):
        x, y = series(records, x_key, key)
        if not x.size:
            continue
        color = f"C{i % 10}"
        if smooth:
            ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            y = moving_average(y, cfg.smooth)
        marker = "o" if x.size <= MARKER_MAX_POINTS else None
        ax.plot(x, y, color=color, label=label, marker=marker, markersize=3, linewidth=1.2)
    ax.set_title(key + (f" (moving average of {cfg.smooth})" if smooth else ""), fontsize="medium")
    ax.set_xlabel(X_LABELS[cfg.x])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def draw(cfg: PlotConfig, runs: Sequence[tuple[str, list[dict]]], keys: Sequence[str]) -> Figure:
    """A figure of len(keys) panels, COLUMNS wide (fewer with fewer panels), every run in every panel."""
    columns = min(COLUMNS, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig = new_figure((PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        _draw_panel(ax, key, runs, cfg)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    if cfg.title:
        fig.suptitle(cfg.title)
    return fig


def run_plot(cfg: PlotConfig) -> Path:
    """Draw `cfg.runs` into `cfg.out`; prints what was skipped and "wrote FILE (N runs, M panels)".

    ConfigError for a missing or empty run, when no metric is in any run, or without matplotlib.
    """
    runs = [(label, load_run(run)) for label, run in zip(run_labels(cfg.runs), cfg.runs, strict=True)]
    keys, unmatched = panel_keys(cfg.metrics, [records for _, records in runs], X_KEYS[cfg.x])
    if not keys:
        raise ConfigError(
            f"plot: none of the metrics {', '.join(cfg.metrics)} is in any run (against x={cfg.x})"
        )
    if unmatched:
        print(f"plot: skipped, in no run: {', '.join(unmatched)}")
    save_png(draw(cfg, runs, keys), cfg.out)
    print(f"wrote {cfg.out} ({len(runs)} runs, {len(keys)} panels)")
    return cfg.out
