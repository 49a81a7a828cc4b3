"""Scaling-law fits over a ladder of runs: L(N) = E + A·N^-alpha and L(N, D) = E + A·N^-alpha + B·D^-beta.

Method (both fits): for fixed exponents the model is linear in (E, A[, B]), so those come from a
linear least-squares solve and only the exponents are searched (variable projection): first on a
log-spaced grid over EXPONENT_RANGE (GRID_1D points, or GRID_2D squared, in one batched solve), then
refined by Levenberg–Marquardt on the log exponents. The residuals minimised are relative,
(fit - loss) / loss, close to the log-loss error Hoffmann et al. use (without their Huber term).
Coefficients A and B must come out positive (losses fall with N and D); E is left free.
numpy only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from olmo_fn.errors import ConfigError
from olmo_fn.plot import new_figure, save_png

EXPONENT_RANGE = (0.01, 4.0)
"""Exponents alpha and beta are searched (and kept) within these bounds."""
GRID_1D = 400
GRID_2D = 60
MIN_POWER_LAW_POINTS = 3
MIN_CHINCHILLA_POINTS = 5
FIGURE_INCHES = (7.0, 4.8)


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """L(N) = E + A·N^-alpha fitted to points; rmse is the root-mean-square of (fit - loss) on them."""

    E: float
    A: float
    alpha: float
    rmse: float

    def predict(self, n: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """The fitted loss at model size(s) n: a float for a scalar, an array otherwise."""
        out = self.E + self.A * np.asarray(n, dtype=float) ** -self.alpha
        return float(out) if out.ndim == 0 else out

    def formula(self) -> str:
        return f"L(N) = {self.E:.4g} + {self.A:.4g}·N^-{self.alpha:.4g}"


@dataclasses.dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A·N^-alpha + B·D^-beta fitted to points; rmse as in PowerLawFit."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rmse: float

    def predict(
        self, n: float | Sequence[float] | np.ndarray, d: float | Sequence[float] | np.ndarray
    ) -> float | np.ndarray:
        """The fitted loss at model size(s) n trained on token count(s) d (broadcast together)."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        out = self.E + self.A * n**-self.alpha + self.B * d**-self.beta
        return float(out) if out.ndim == 0 else out

    def formula(self) -> str:
        return f"L(N, D) = {self.E:.4g} + {self.A:.4g}·N^-{self.alpha:.4g} + {self.B:.4g}·D^-{self.beta:.4g}"


def _column(where: str, name: str, values: Sequence[float]) -> np.ndarray:
    """`values` as a float vector; ConfigError unless every value is finite and > 0."""
    array = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(array) & (array > 0)):
        raise ConfigError(f"{where}: {name} must be finite and > 0, got {array.tolist()}")
    return array


def _columns(where: str, minimum: int, **named: Sequence[float]) -> list[np.ndarray]:
    """The named columns as vectors of one length, at least `minimum` long (ConfigError otherwise)."""
    arrays = [_column(where, name, values) for name, values in named.items()]
    lengths = {name: len(a) for name, a in zip(named, arrays, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"{where}: {', '.join(named)} differ in length ({lengths})")
    if len(arrays[0]) < minimum:
        raise ConfigError(f"{where}: needs at least {minimum} points, got {len(arrays[0])}")
    return arrays


def _require_distinct(where: str, name: str, values: np.ndarray, why: str) -> None:
    distinct = len(np.unique(values))
    if distinct < 3:
        raise ConfigError(f"{where}: needs at least 3 distinct {name} values {why}, got {distinct}")


def _design(sizes: list[np.ndarray], exponents: np.ndarray) -> np.ndarray:
    """Design matrices [1, sizes[0]^-e0, sizes[1]^-e1, ...] of shape (..., points, 1 + len(sizes))
    for exponents of shape (..., len(sizes))."""
    powers = [size ** -exponents[..., j, None] for j, size in enumerate(sizes)]
    return np.stack([np.ones_like(powers[0]), *powers], axis=-1)


def _profile(
    sizes: list[np.ndarray], loss: np.ndarray, exponents: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients c minimising the relative residuals (design @ c - loss) / loss, those residuals)
    at fixed exponents; columns are scaled for conditioning."""
    design = _design(sizes, exponents) / loss[:, None]
    scale = np.abs(design).max(axis=0)
    coef, *_ = np.linalg.lstsq(design / scale, np.ones_like(loss), rcond=None)
    return coef / scale, design @ (coef / scale) - 1.0


def _cost(sizes: list[np.ndarray], loss: np.ndarray, exponents: np.ndarray) -> float:
    """Sum of squared relative residuals; inf where exponents leave EXPONENT_RANGE or a coefficient <= 0."""
    return float(_grid_costs(sizes, loss, exponents[None])[0])


def _jacobian(fn: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central-difference Jacobian of the vector function `fn` at theta."""
    columns = []
    for i in range(theta.size):
        step = np.zeros_like(theta)
        step[i] = h
        columns.append((fn(theta + step) - fn(theta - step)) / (2 * h))
    return np.stack(columns, axis=1)


def _refine(
    sizes: list[np.ndarray], loss: np.ndarray, start: np.ndarray, iterations: int = 200
) -> np.ndarray:
    """Levenberg–Marquardt on the log exponents from `start`; only steps lowering _cost are taken."""
    theta = np.log(start)
    cost = _cost(sizes, loss, start)
    damping = 1e-3

    def residual(t: np.ndarray) -> np.ndarray:
        return _profile(sizes, loss, np.exp(t))[1]

    for _ in range(iterations):
        r = residual(theta)
        jac = _jacobian(residual, theta)
        hess = jac.T @ jac
        grad = jac.T @ r
        while damping < 1e12:
            lhs = hess + damping * np.diag(np.maximum(np.diag(hess), 1e-12))
            step = -np.linalg.solve(lhs, grad)
            new_cost = _cost(sizes, loss, np.exp(theta + step))
            if new_cost < cost:
                break
            damping *= 4
        else:
            break
        theta, improvement, cost = theta + step, cost - new_cost, new_cost
        damping = max(damping / 3, 1e-12)
        if np.max(np.abs(step)) < 1e-12 or improvement <= 1e-15 * cost or cost < 1e-28:
            break
    return np.exp(theta)


def _grid_costs(sizes: list[np.ndarray], loss: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """_cost at every row of `grid` (exponent sets) at once, by a batched pseudo-inverse."""
    lo, hi = EXPONENT_RANGE
    design = _design(sizes, grid) / loss[:, None]
    scale = np.abs(design).max(axis=-2, keepdims=True)
    coef = (np.linalg.pinv(design / scale) @ np.ones_like(loss)[:, None])[..., 0] / scale[..., 0, :]
    residual = (design @ coef[..., None])[..., 0] - 1.0
    costs = np.sum(residual**2, axis=-1)
    valid = np.all(np.isfinite(coef), axis=-1) & np.all(coef[..., 1:] > 0, axis=-1)
    valid &= np.all((grid >= lo) & (grid <= hi), axis=-1)
    return np.where(valid, costs, np.inf)


def _search(where: str, sizes: list[np.ndarray], loss: np.ndarray) -> np.ndarray:
    """Exponents minimising _cost: the best of a log-spaced grid, then refined; ConfigError if none valid."""
    axis = np.geomspace(*EXPONENT_RANGE, GRID_1D if len(sizes) == 1 else GRID_2D)
    grid = np.stack(np.meshgrid(*[axis] * len(sizes), indexing="ij"), axis=-1).reshape(-1, len(sizes))
    costs = _grid_costs(sizes, loss, grid)
    best = int(np.argmin(costs))
    if not np.isfinite(costs[best]):
        raise ConfigError(
            f"{where}: no fit with positive coefficients: the losses do not fall with size "
            f"(exponents searched in {EXPONENT_RANGE})"
        )
    return _refine(sizes, loss, grid[best])


def _rmse(predicted: np.ndarray, loss: np.ndarray) -> float:
    return float(np.sqrt(np.mean((predicted - loss) ** 2)))


def fit_power_law(n: Sequence[float], loss: Sequence[float]) -> PowerLawFit:
    """Fit L(N) = E + A·N^-alpha to (model size, loss) points; 3 points (distinct sizes) are interpolated.

    ConfigError for fewer than 3 points or distinct sizes, non-positive values, or losses that do not
    fall with size.
    """
    where = "fit_power_law"
    n_arr, loss_arr = _columns(where, MIN_POWER_LAW_POINTS, n=n, loss=loss)
    _require_distinct(where, "n", n_arr, "(model sizes)")

    exponents = _search(where, [n_arr], loss_arr)
    coef, _ = _profile([n_arr], loss_arr, exponents)
    fit = PowerLawFit(E=float(coef[0]), A=float(coef[1]), alpha=float(exponents[0]), rmse=0.0)
    return dataclasses.replace(fit, rmse=_rmse(fit.predict(n_arr), loss_arr))


def fit_chinchilla(n: Sequence[float], d: Sequence[float], loss: Sequence[float]) -> ChinchillaFit:
    """Fit L(N, D) = E + A·N^-alpha + B·D^-beta to (model size, tokens, loss) points.

    ConfigError for fewer than 5 points, fewer than 3 distinct sizes or token budgets (B and beta, or
    A and alpha, could not be told apart), non-positive values, or losses that do not fall.
    """
    where = "fit_chinchilla"
    n_arr, d_arr, loss_arr = _columns(where, MIN_CHINCHILLA_POINTS, n=n, d=d, loss=loss)
    _require_distinct(where, "n", n_arr, "(model sizes)")
    _require_distinct(where, "d", d_arr, "(token budgets; with one budget use fit_power_law)")

    exponents = _search(where, [n_arr, d_arr], loss_arr)
    coef, _ = _profile([n_arr, d_arr], loss_arr, exponents)
    fit = ChinchillaFit(
        E=float(coef[0]),
        A=float(coef[1]),
        alpha=float(exponents[0]),
        B=float(coef[2]),
        beta=float(exponents[1]),
        rmse=0.0,
    )
    return dataclasses.replace(fit, rmse=_rmse(fit.predict(n_arr, d_arr), loss_arr))


Fit = PowerLawFit | ChinchillaFit


def _point_columns(fit: Fit, points: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """Columns of `points`: (n, loss) pairs for a PowerLawFit, (n, d, loss) triples for a ChinchillaFit."""
    width = 2 if isinstance(fit, PowerLawFit) else 3
    shape = "(n, loss)" if width == 2 else "(n, d, loss)"
    rows = [tuple(p) for p in points]
    if not rows or any(len(row) != width for row in rows):
        raise ConfigError(f"points must be one or more {shape} tuples for a {type(fit).__name__}")
    names = ["n", "loss"] if width == 2 else ["n", "d", "loss"]
    return [_column("points", name, col) for name, col in zip(names, zip(*rows, strict=True), strict=True)]


def _check_target(fit: Fit, target_n: float | None, target_d: float | None) -> None:
    if target_n is not None and target_n <= 0:
        raise ConfigError(f"target_n must be > 0, got {target_n}")
    if isinstance(fit, ChinchillaFit) and (target_n is None) != (target_d is None):
        raise ConfigError("a ChinchillaFit target needs both target_n and target_d")
    if isinstance(fit, PowerLawFit) and target_d is not None:
        raise ConfigError("target_d applies to a ChinchillaFit only; a PowerLawFit has no D")
    if target_d is not None and target_d <= 0:
        raise ConfigError(f"target_d must be > 0, got {target_d}")


def _curve_n(n: np.ndarray, target_n: float | None) -> np.ndarray:
    """Log-spaced sizes spanning the points and the target, with a little margin."""
    hi = max(n.max(), target_n or 0.0)
    return np.geomspace(n.min() / 1.5, hi * 1.5, 200)


def plot_fit(
    fit: Fit,
    points: Sequence[Sequence[float]],
    out: Path,
    target_n: float | None = None,
    target_d: float | None = None,
) -> Path:
    """A log-log PNG of the points, the fitted curve (one per token budget for a ChinchillaFit) and the
    prediction at the target, written atomically to `out` (.png); returns `out`.

    points: (n, loss) pairs for a PowerLawFit, (n, d, loss) triples for a ChinchillaFit, whose target
    needs target_d as well.
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"plot_fit: out must end in .png, got {str(out)!r}")
    columns = _point_columns(fit, points)
    _check_target(fit, target_n, target_d)
    fig = new_figure(FIGURE_INCHES)
    ax = fig.subplots()
    curve_n = _curve_n(columns[0], target_n)
    if isinstance(fit, PowerLawFit):
        n, loss = columns
        ax.scatter(n, loss, color="C0", zorder=3, label="runs")
        ax.plot(curve_n, fit.predict(curve_n), color="C0", label="fit")
    else:
        n, d, loss = columns
        budgets = sorted(set(d.tolist()) | ({target_d} if target_d else set()))
        for i, budget in enumerate(budgets):
            mask = d == budget
            if mask.any():
                ax.scatter(n[mask], loss[mask], color=f"C{i % 10}", zorder=3)
            ax.plot(curve_n, fit.predict(curve_n, budget), color=f"C{i % 10}", label=f"D = {budget:.3g}")
    if fit.E > 0:
        ax.axhline(fit.E, color="gray", linestyle=":", label=f"E = {fit.E:.3g}")
    if target_n is not None:
        predicted = fit.predict(target_n) if isinstance(fit, PowerLawFit) else fit.predict(target_n, target_d)
        ax.scatter([target_n], [predicted], marker="*", s=160, color="C3", zorder=4, label="target")
        ax.annotate(
            f"{predicted:.4f}",
            (target_n, predicted),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize="small",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter  # present: new_figure imported matplotlib

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.set_xlabel("N (parameters)")
    ax.set_ylabel("loss")
    ax.set_title(f"{fit.formula()}   rmse {fit.rmse:.2g}", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return save_png(fig, out)


def fit_table(
    fit: Fit,
    points: Sequence[Sequence[float]],
    target_n: float | None = None,
    target_d: float | None = None,
) -> str:
    """A markdown table of the points: loss, fitted loss and residual (loss - fit), then the target row."""
    columns = _point_columns(fit, points)
    _check_target(fit, target_n, target_d)
    power_law = isinstance(fit, PowerLawFit)
    head = ["N"] + ([] if power_law else ["D"]) + ["loss", "fit", "residual"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in zip(*columns, strict=True):
        *sizes, loss = row
        predicted = fit.predict(*sizes)
        cells = [f"{s:.4g}" for s in sizes] + [f"{loss:.4f}", f"{predicted:.4f}", f"{loss - predicted:+.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if target_n is not None:
        sizes = [target_n] if power_law else [target_n, target_d]
        cells = [f"{s:.4g}" for s in sizes] + ["", f"{fit.predict(*sizes):.4f}", "(target)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
