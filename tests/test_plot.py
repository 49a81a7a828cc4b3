"""`plot`: metrics.jsonl of several runs drawn into one PNG; the image is read back and measured."""

from __future__ import annotations

import math
import sys
from importlib.util import find_spec

import numpy as np
import orjson
import pytest

from olmo_fn.errors import ConfigError
from olmo_fn.plot import (
    COLUMNS,
    DPI,
    PANEL_INCHES,
    PlotConfig,
    draw,
    load_run,
    moving_average,
    panel_keys,
    run_labels,
    run_plot,
    series,
)

needs_matplotlib = pytest.mark.skipif(find_spec("matplotlib") is None, reason="needs the plot extra")

# matplotlib's default colours of the first two runs, as RGB in [0, 1].
C0 = np.array([0x1F, 0x77, 0xB4]) / 255
C1 = np.array([0xFF, 0x7F, 0x0E]) / 255


def _record(step, loss, eval_loss=None):
    rec = {"step": step, "loss": loss, "lr": 1e-3 * min(1.0, step / 10), "tokens_seen": 4096 * step}
    rec["tokens_per_s"] = 5000.0 + 10 * step
    if eval_loss is not None:
        rec |= {"eval/val/loss": eval_loss, "eval/val/tokens": 16320, "eval_s": 0.5}
    return rec


def _write(path, records, torn=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + torn)
    return path


def _loss_a(step):
    return 1.5 + 4.0 * math.exp(-step / 15)


@pytest.fixture
def runs(tmp_path):
    """run-a (a directory): steps 1-60 with evaluations every 20 steps, interrupted after step 40 with a
    torn line and resumed from step 30, so steps 31-40 appear twice (the second, +0.25, is the one kept).
    run-b (its metrics.jsonl given as a file): steps 1-50, no evaluation."""
    first = [_record(s, _loss_a(s), _loss_a(s) + 0.1 if s % 20 == 0 else None) for s in range(1, 41)]
    resumed = [
        _record(s, _loss_a(s) + 0.25, _loss_a(s) + 0.1 if s % 20 == 0 else None) for s in range(31, 61)
    ]
    run_a = tmp_path / "run-a"
    _write(run_a / "metrics.jsonl", first, torn=b'{"step": 41, "lo\n')
    with open(run_a / "metrics.jsonl", "ab") as f:
        f.write(b"".join(orjson.dumps(r) + b"\n" for r in resumed))
    b_file = _write(tmp_path / "run-b" / "metrics.jsonl", [_record(s, 2.0 + 3.0 / s) for s in range(1, 51)])
    return run_a, b_file


def _size(panels):
    columns = min(COLUMNS, panels)
    rows = math.ceil(panels / columns)
    return round(columns * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def _image(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)[..., :3]


def _assert_drawn(image, panels):
    width, height = _size(panels)
    assert image.shape[:2] == (height, width)
    assert image.var() > 0
    assert (image.min(axis=-1) < 0.9).mean() > 0.02


def _pixels_of(image, color, tol=0.06):
    return int(np.all(np.abs(image - color) < tol, axis=-1).sum())


def test_load_run_keeps_the_last_record_per_step(runs):
    run_a, _ = runs
    records = load_run(run_a)
    assert [r["step"] for r in records] == list(range(1, 61))
    assert records[34]["loss"] == pytest.approx(_loss_a(35) + 0.25)
    assert records[29]["loss"] == pytest.approx(_loss_a(30))


@needs_matplotlib
def test_run_plot_default_metrics(runs, tmp_path, capsys):
    out = tmp_path / "plots" / "curves.png"
    assert run_plot(PlotConfig(runs=runs, out=out, title="two runs")) == out
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "plot: skipped, in no run: downstream/*/acc",
        f"wrote {out} (2 runs, 4 panels)",
    ]
    _assert_drawn(_image(out), panels=4)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]


@needs_matplotlib
def test_runs_are_overlaid_each_in_its_colour(runs, tmp_path):
    both = run_plot(PlotConfig(runs=runs, out=tmp_path / "loss.png", metrics=("loss",)))
    image = _image(both)
    _assert_drawn(image, panels=1)
    assert _pixels_of(image, C0) > 300 and _pixels_of(image, C1) > 300

    eval_only = _image(run_plot(PlotConfig(runs=runs, out=tmp_path / "eval.png", metrics=("eval/*/loss",))))
    _assert_drawn(eval_only, panels=1)
    assert _pixels_of(eval_only, C0) > 100
    assert _pixels_of(eval_only, C1) < 5  # run-b has no evaluation


@needs_matplotlib
def test_x_axis_step_or_tokens(runs, tmp_path):
    run_a, _ = runs
    records = load_run(run_a)
    x, y = series(records, "tokens_seen", "eval/val/loss")
    np.testing.assert_array_equal(x, [4096 * 20, 4096 * 40, 4096 * 60])
    np.testing.assert_allclose(y, [_loss_a(s) + 0.1 for s in (20, 40, 60)])
    images = {}
    for x_axis in ("step", "tokens"):
        out = run_plot(
            PlotConfig(runs=runs, out=tmp_path / f"{x_axis}.png", x=x_axis, metrics=("loss", "lr"))
        )
        images[x_axis] = _image(out)
        _assert_drawn(images[x_axis], panels=2)
    assert not np.array_equal(images["step"], images["tokens"])


@needs_matplotlib
@pytest.mark.parametrize("x_axis", ["step", "tokens"])
def test_drawn_lines_carry_each_runs_data(runs, x_axis):
    cfg = PlotConfig(runs=runs, out="unused.png", x=x_axis, metrics=("loss", "eval/*/loss"), smooth=4)
    loaded = [("run-a", load_run(runs[0])), ("run-b", load_run(runs[1]))]
    fig = draw(cfg, loaded, ["loss", "eval/val/loss"])
    loss_ax, eval_ax = fig.axes
    scale = 4096 if x_axis == "tokens" else 1
    steps_a, steps_b = np.arange(1, 61), np.arange(1, 51)
    labelled = {line.get_label(): line for line in loss_ax.lines if not line.get_label().startswith("_")}
    assert sorted(labelled) == ["run-a", "run-b"]
    np.testing.assert_array_equal(labelled["run-a"].get_xdata(), scale * steps_a)
    np.testing.assert_array_equal(labelled["run-b"].get_xdata(), scale * steps_b)
    raw_a = np.array([_loss_a(s) + (0.25 if s > 30 else 0.0) for s in steps_a])
    trailing_mean = [raw_a[max(0, i - 3) : i + 1].mean() for i in range(raw_a.size)]
    np.testing.assert_allclose(labelled["run-a"].get_ydata(), trailing_mean)
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["run-a", "run-b"]
    (eval_line,) = eval_ax.lines  # run-b has no evaluation; eval losses are not smoothed
    np.testing.assert_array_equal(eval_line.get_xdata(), scale * np.array([20, 40, 60]))
    np.testing.assert_allclose(eval_line.get_ydata(), [_loss_a(s) + 0.1 for s in (20, 40, 60)])


@needs_matplotlib
def test_tokens_axis_needs_tokens_seen(tmp_path):
    run = _write(tmp_path / "old" / "metrics.jsonl", [{"step": s, "loss": 3.0 / s} for s in range(1, 9)])
    run_plot(PlotConfig(runs=(run,), out=tmp_path / "step.png", metrics=("loss",)))
    with pytest.raises(ConfigError, match=r"none of the metrics loss is in any run \(against x=tokens\)"):
        run_plot(PlotConfig(runs=(run,), out=tmp_path / "tokens.png", x="tokens", metrics=("loss",)))


@needs_matplotlib
def test_smoothing(runs, tmp_path):
    np.testing.assert_allclose(moving_average(np.array([1.0, 2, 3, 4, 5]), 2), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average(np.array([4.0, 2, 6]), 10), [4, 3, 4])
    np.testing.assert_array_equal(moving_average(np.array([3.0, 1.0]), 1), [3.0, 1.0])
    raw = _image(run_plot(PlotConfig(runs=runs, out=tmp_path / "raw.png", metrics=("loss",))))
    smooth = _image(run_plot(PlotConfig(runs=runs, out=tmp_path / "s.png", metrics=("loss",), smooth=8)))
    _assert_drawn(smooth, panels=1)
    assert not np.array_equal(raw, smooth)


def test_patterns_expand_to_every_matching_key():
    records = [
        {"step": 1, "loss": 2.0, "downstream/piqa/acc": 0.6, "downstream/arc/acc": 0.3, "note": "x"},
        {"step": 2, "loss": 1.9, "downstream/arc/acc_norm": 0.31},
    ]
    keys, unmatched = panel_keys(("loss", "downstream/*/acc", "eval/*/loss", "note"), [records], "step")
    assert keys == ["loss", "downstream/arc/acc", "downstream/piqa/acc"]
    assert unmatched == ["eval/*/loss", "note"]


def test_run_labels(tmp_path):
    (tmp_path / "x" / "run").mkdir(parents=True)
    (tmp_path / "y" / "run").mkdir(parents=True)
    assert run_labels([tmp_path / "x" / "run", tmp_path / "z" / "metrics.jsonl"]) == ["run", "z"]
    dup = [tmp_path / "x" / "run", tmp_path / "y" / "run"]
    assert run_labels(dup) == [str(p) for p in dup]


def _one_line_error(match, fn):
    with pytest.raises(ConfigError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_config_errors(tmp_path):
    run = tmp_path / "run"
    _one_line_error("runs must not be empty", lambda: PlotConfig(runs=(), out=tmp_path / "a.png"))
    _one_line_error(r"out must end in \.png, got '.*a\.jpg'", lambda: PlotConfig(runs=(run,), out="a.jpg"))
    _one_line_error("smooth must be >= 0", lambda: PlotConfig(runs=(run,), out="a.png", smooth=-1))
    _one_line_error("metrics must be one or more", lambda: PlotConfig(runs=(run,), out="a.png", metrics=()))
    _one_line_error("x must be one of step, tokens", lambda: PlotConfig(runs=(run,), out="a.png", x="time"))


def test_missing_and_empty_runs(runs, tmp_path):
    out = tmp_path / "out.png"
    missing = tmp_path / "nope"
    _one_line_error(
        f"{missing}/metrics.jsonl|{missing}", lambda: run_plot(PlotConfig(runs=(*runs, missing), out=out))
    )
    empty = _write(tmp_path / "empty" / "metrics.jsonl", [], torn=b"\n\n")
    _one_line_error(
        f"{empty}: no metrics records", lambda: run_plot(PlotConfig(runs=(runs[0], empty.parent), out=out))
    )
    torn = _write(tmp_path / "torn" / "metrics.jsonl", [], torn=b'{"step": 1, "lo')
    _one_line_error(f"{torn}: no metrics records", lambda: run_plot(PlotConfig(runs=(torn,), out=out)))
    _one_line_error(
        "none of the metrics nope is in any run",
        lambda: run_plot(PlotConfig(runs=runs, out=out, metrics=("nope",))),
    )
    assert not out.exists()


@needs_matplotlib
def test_existing_png_is_replaced(runs, tmp_path):
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    run_plot(PlotConfig(runs=runs, out=out, metrics=("lr",)))
    _assert_drawn(_image(out), panels=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "run-a", "run-b"]


def test_without_matplotlib(runs, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"^plot needs matplotlib: pip install 'olmo_fn\[plot\]'$"):
        run_plot(PlotConfig(runs=runs, out=tmp_path / "x.png"))


def test_config_parses_from_the_command_line():
    tyro = pytest.importorskip("tyro")
    cfg = tyro.cli(PlotConfig, args=["a", "b/metrics.jsonl", "--out", "o.png", "--x", "tokens"])
    assert [str(r) for r in cfg.runs] == ["a", "b/metrics.jsonl"] and cfg.x == "tokens"
    assert cfg.metrics == PlotConfig(runs=("a",), out="o.png").metrics and cfg.smooth == 0
