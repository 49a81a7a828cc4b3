"""Scaling-law fits: parameters recovered from data made by the formulas here, refusals, plot and table.

Tolerances for the noisy fits were set from repeated fits over 20 seeds (0.2% multiplicative noise):
the worst relative errors seen were E 1.3%, A 9.7%, alpha 2.1%, prediction at 10x the largest size 0.7%
(power law), and E 1.2%, A 6.6%, alpha 1.4%, B 11%, beta 2.3%, held-out prediction 0.4% (Chinchilla).
The bounds below are about twice those.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

import numpy as np
import pytest

from olmo_fn.errors import ConfigError
from olmo_fn.scaling_law import (
    ChinchillaFit,
    PowerLawFit,
    fit_chinchilla,
    fit_power_law,
    fit_table,
    plot_fit,
)

needs_matplotlib = pytest.mark.skipif(find_spec("matplotlib") is None, reason="needs the plot extra")

E, A, ALPHA = 1.69, 406.4, 0.34
B, BETA = 410.7, 0.28
NOISE = 0.002


def power_law(n, e=E, a=A, alpha=ALPHA):
    return e + a * np.asarray(n, dtype=float) ** -alpha


def chinchilla(n, d):
    return E + A * np.asarray(n, dtype=float) ** -ALPHA + B * np.asarray(d, dtype=float) ** -BETA


def noisy(loss, seed):
    return loss * (1 + NOISE * np.random.default_rng(seed).standard_normal(np.shape(loss)))


SIZES = np.geomspace(1e6, 1e9, 7)


def ladder_grid():
    n, d = np.meshgrid(np.geomspace(1e7, 1e9, 5), np.geomspace(1e8, 1e11, 5))
    return n.ravel(), d.ravel()


def rel(a, b):
    return abs(a / b - 1)


def test_power_law_exact_data_recovers_parameters():
    fit = fit_power_law(SIZES, power_law(SIZES))
    assert rel(fit.E, E) < 1e-6 and rel(fit.A, A) < 1e-6 and rel(fit.alpha, ALPHA) < 1e-6
    assert fit.rmse < 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_noisy_recovers_parameters_and_extrapolates(seed):
    fit = fit_power_law(SIZES, noisy(power_law(SIZES), seed))
    assert rel(fit.E, E) < 0.03
    assert rel(fit.alpha, ALPHA) < 0.05
    assert rel(fit.A, A) < 0.2
    assert rel(fit.predict(1e10), power_law(1e10)) < 0.015
    assert 0.2 * NOISE * E < fit.rmse < 3 * NOISE * power_law(SIZES).max()


@pytest.mark.parametrize("seed", [3, 4])
def test_power_law_fit_is_no_worse_than_the_truth(seed):
    """The fit minimises relative squared error, so it must beat the generating parameters on it."""
    loss = noisy(power_law(SIZES), seed)
    fit = fit_power_law(SIZES, loss)
    fitted = np.sum((power_law(SIZES, fit.E, fit.A, fit.alpha) / loss - 1) ** 2)
    truth = np.sum((power_law(SIZES) / loss - 1) ** 2)
    assert fitted <= truth * (1 + 1e-9)


def test_three_points_are_interpolated():
    n = np.array([3e5, 4e6, 9e7])
    loss = power_law(n, 2.1, 55.0, 0.21)
    fit = fit_power_law(n.tolist(), loss.tolist())
    np.testing.assert_allclose(fit.predict(n), loss, rtol=1e-9)
    assert fit.rmse < 1e-9
    np.testing.assert_allclose([fit.E, fit.A, fit.alpha], [2.1, 55.0, 0.21], rtol=1e-6)


def test_predict_returns_float_for_scalar_and_array_for_sequence():
    fit = PowerLawFit(E=1.0, A=8.0, alpha=1.0 / 3.0, rmse=0.0)
    assert isinstance(fit.predict(8.0), float) and fit.predict(8.0) == pytest.approx(5.0)
    np.testing.assert_allclose(fit.predict([1.0, 64.0]), [9.0, 3.0])
    chin = ChinchillaFit(E=1.0, A=8.0, alpha=1 / 3, B=4.0, beta=0.5, rmse=0.0)
    assert chin.predict(8.0, 16.0) == pytest.approx(6.0)
    np.testing.assert_allclose(chin.predict([8.0, 64.0], 16.0), [6.0, 4.0])


@pytest.mark.parametrize(
    "n, loss, message",
    [
        ([1e6, 1e7], [3.0, 2.5], "at least 3 points"),
        ([1e6, 1e7, 1e8], [3.0, 2.5], "differ in length"),
        ([1e6, -1e7, 1e8], [3.0, 2.5, 2.2], "n must be finite and > 0"),
        ([1e6, 1e7, 1e8], [3.0, float("nan"), 2.2], "loss must be finite and > 0"),
        ([1e6, 1e6, 1e8], [3.0, 2.9, 2.2], "3 distinct n"),
        ([1e6, 1e7, 1e8, 1e9], [2.0, 2.2, 2.5, 3.0], "do not fall"),
    ],
)
def test_power_law_refusals(n, loss, message):
    with pytest.raises(ConfigError, match=message) as err:
        fit_power_law(n, loss)
    assert "\n" not in str(err.value) and str(err.value).startswith("fit_power_law:")


def test_chinchilla_exact_grid_recovers_parameters():
    n, d = ladder_grid()
    fit = fit_chinchilla(n, d, chinchilla(n, d))
    got = [fit.E, fit.A, fit.alpha, fit.B, fit.beta]
    np.testing.assert_allclose(got, [E, A, ALPHA, B, BETA], rtol=1e-6)
    assert fit.rmse < 1e-9


@pytest.mark.parametrize("seed", [0, 1])
def test_chinchilla_noisy_recovers_parameters_and_extrapolates(seed):
    n, d = ladder_grid()
    fit = fit_chinchilla(n, d, noisy(chinchilla(n, d), seed))
    assert rel(fit.E, E) < 0.03
    assert rel(fit.alpha, ALPHA) < 0.04
    assert rel(fit.beta, BETA) < 0.06
    assert rel(fit.A, A) < 0.2
    assert rel(fit.B, B) < 0.3
    assert rel(fit.predict(1e10, 2e11), chinchilla(1e10, 2e11)) < 0.01


@pytest.mark.parametrize(
    "n, d, message",
    [
        ([1e7, 1e8, 1e9, 1e7], [1e9, 1e10, 1e11, 1e11], "at least 5 points"),
        ([1e7, 1e8, 1e9, 1e7, 1e8, 1e9], [1e9] * 3 + [1e10] * 3, "3 distinct d"),
        ([1e7, 1e8, 1e7, 1e8, 1e7, 1e8], [1e9, 1e9, 1e10, 1e10, 1e11, 1e11], "3 distinct n"),
    ],
)
def test_chinchilla_refusals(n, d, message):
    with pytest.raises(ConfigError, match=message) as err:
        fit_chinchilla(n, d, chinchilla(n, d))
    assert "\n" not in str(err.value) and str(err.value).startswith("fit_chinchilla:")


def _read_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


def _assert_drawn(image, width, height):
    assert image.shape[:2] == (height, width)
    rgb = image[..., :3]
    assert rgb.var() > 0
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.02


@needs_matplotlib
def test_plot_fit_power_law(tmp_path):
    loss = noisy(power_law(SIZES), 0)
    fit = fit_power_law(SIZES, loss)
    out = plot_fit(fit, list(zip(SIZES, loss, strict=True)), tmp_path / "fit.png", target_n=1e10)
    assert out == tmp_path / "fit.png"
    _assert_drawn(_read_png(out), 700, 480)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.png"]


@needs_matplotlib
def test_plot_fit_chinchilla_with_target(tmp_path):
    n, d = ladder_grid()
    loss = chinchilla(n, d)
    fit = fit_chinchilla(n, d, loss)
    points = list(zip(n, d, loss, strict=True))
    out = plot_fit(fit, points, tmp_path / "chin.png", target_n=1e10, target_d=2e11)
    _assert_drawn(_read_png(out), 700, 480)
    with pytest.raises(ConfigError, match="both target_n and target_d"):
        plot_fit(fit, points, tmp_path / "x.png", target_n=1e10)
    with pytest.raises(ConfigError, match=r"\(n, d, loss\)"):
        plot_fit(fit, [(1e7, 3.0)], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="out must end in .png"):
        plot_fit(fit, points, tmp_path / "x.jpg")
    assert not (tmp_path / "x.png").exists()


def test_plot_fit_without_matplotlib(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    fit = PowerLawFit(E=1.0, A=8.0, alpha=0.3, rmse=0.0)
    with pytest.raises(ConfigError, match=r"plot needs matplotlib: pip install 'olmo_fn\[plot\]'"):
        plot_fit(fit, [(1e6, 1.1), (1e7, 1.05), (1e8, 1.02)], tmp_path / "fit.png")


def _table_rows(table):
    lines = table.splitlines()
    assert lines[1].startswith("|---")
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]], lines[0]


def test_fit_table_power_law_rows_and_residuals():
    loss = noisy(power_law(SIZES), 1)
    fit = fit_power_law(SIZES, loss)
    rows, head = _table_rows(fit_table(fit, list(zip(SIZES, loss, strict=True)), target_n=1e10))
    assert head == "| N | loss | fit | residual |"
    assert len(rows) == len(SIZES) + 1
    for (n_cell, loss_cell, fit_cell, residual_cell), n, y in zip(rows, SIZES, loss, strict=False):
        expected = fit.E + fit.A * n**-fit.alpha
        assert float(n_cell) == pytest.approx(n, rel=1e-3)
        assert float(loss_cell) == pytest.approx(y, abs=1e-4)
        assert float(fit_cell) == pytest.approx(expected, abs=1e-4)
        assert float(residual_cell) == pytest.approx(y - expected, abs=1.5e-4)
    assert rows[-1][0] == "1e+10" and rows[-1][1] == "" and rows[-1][3] == "(target)"
    assert float(rows[-1][2]) == pytest.approx(fit.E + fit.A * 1e10**-fit.alpha, abs=1e-4)


def test_fit_table_chinchilla_has_d_column():
    fit = ChinchillaFit(E=1.0, A=8.0, alpha=1 / 3, B=4.0, beta=0.5, rmse=0.0)
    rows, head = _table_rows(fit_table(fit, [(8.0, 16.0, 6.5), (64.0, 16.0, 4.0)]))
    assert head == "| N | D | loss | fit | residual |"
    assert rows == [["8", "16", "6.5000", "6.0000", "+0.5000"], ["64", "16", "4.0000", "4.0000", "+0.0000"]]
    with pytest.raises(ConfigError, match="target_d applies to a ChinchillaFit only"):
        fit_table(PowerLawFit(E=1.0, A=1.0, alpha=1.0, rmse=0.0), [(1.0, 2.0)], target_n=10.0, target_d=5.0)
