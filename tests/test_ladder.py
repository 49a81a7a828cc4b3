"""`ladder`: rungs train as resumable run directories, finished rungs are skipped, the fit and its held-out
prediction are reported, and the figure and table are written."""

from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np
import orjson
import pytest

import olmo_fn.ladder as ladder_module
import olmo_fn.train as train_module
from olmo_fn.errors import ConfigError
from olmo_fn.ladder import LadderConfig, non_embedding_params, plan_rungs, run_ladder, size_model
from olmo_fn.run import main, parse

pytest.importorskip("matplotlib")

TINY = LadderConfig(
    sizes=("16x1", "32x1", "48x1", "64x1"),
    tokens_per_param=(0.25,),
    seq_len=32,
    global_batch_size=4,
    eval_instances=4,
    target="128x2",
    threads=1,
)


def naive_n(d: int, layers: int, mlp_ratio: float = 3.0) -> int:
    """Blocks + final norm of an OLMo 2 stack with as many key/value heads as heads: per layer the four
    attention matrices, q/k norms, the three MLP matrices and two norms."""
    hidden = round(mlp_ratio * d)
    return layers * (4 * d * d + 2 * d + 3 * d * hidden + 2 * d) + d


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def metrics_rows(run_dir) -> list[dict]:
    return [orjson.loads(line) for line in (run_dir / "metrics.jsonl").read_bytes().splitlines()]


def files_state(root, skip=("ladder.md", "ladder.png")) -> dict:
    return {
        p.relative_to(root): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


@pytest.fixture(scope="module")
def tiny_ladder(tmp_path_factory):
    cfg = dataclasses.replace(TINY, out=tmp_path_factory.mktemp("ladder") / "out")
    return cfg, run_ladder(cfg, progress=False)


def test_rung_sizes_count_non_embedding_parameters():
    for size, (d, layers) in {"16x1": (16, 1), "48x3": (48, 3), "128x4": (128, 4)}.items():
        model = size_model(size, head_dim=16, mlp_ratio=3.0)
        assert (model.d_model, model.n_layers, model.n_heads, model.mlp_hidden) == (d, layers, d // 16, 3 * d)
        assert non_embedding_params(model) == naive_n(d, layers)
    rungs = plan_rungs(TINY)
    assert [r.name for r in rungs] == ["16x1-tpp0.25", "32x1-tpp0.25", "48x1-tpp0.25", "64x1-tpp0.25"]
    assert [r.steps for r in rungs] == [round(0.25 * naive_n(d, 1) / (4 * 32)) for d in (16, 32, 48, 64)]
    assert [r.held_out for r in rungs] == [False, False, False, True]


def test_a_tiny_ladder_trains_every_rung_and_reports_the_fit(tiny_ladder):
    cfg, result = tiny_ladder
    for rung, loss in zip(result.rungs, result.losses, strict=True):
        run_dir = cfg.out / rung.name
        assert (run_dir / "config.json").is_file()
        assert (run_dir / "checkpoints" / f"step{rung.steps}" / "manifest.json").is_file()
        rows = metrics_rows(run_dir)
        assert [r["step"] for r in rows] == list(range(1, rung.steps + 1))
        assert [r["step"] for r in rows if "eval/val/loss" in r] == [rung.steps]  # evaluated once, at the end
        assert loss == rows[-1]["eval/val/loss"]
        assert not any(k.startswith("downstream/") for k in rows[-1])
    assert list(result.losses) == sorted(result.losses, reverse=True)  # bigger rungs, lower loss

    fit = result.fit
    for rung, loss in zip(result.rungs[:-1], result.losses[:-1], strict=True):  # 3 points: interpolated
        assert abs(loss - (fit.E + fit.A * rung.n**-fit.alpha)) < 1e-6
    held, held_loss = result.rungs[-1], result.losses[-1]
    assert held.held_out and not any(r.held_out for r in result.rungs[:-1])
    predicted = fit.E + fit.A * held.n**-fit.alpha
    assert result.held_out_errors == pytest.approx((held_loss - predicted,), abs=1e-12)
    assert math.isfinite(result.held_out_errors[0])
    assert result.target_n == naive_n(128, 2)
    assert result.target_prediction == pytest.approx(fit.E + fit.A * naive_n(128, 2) ** -fit.alpha, rel=1e-12)

    report = result.report.read_text()
    for rung, loss in zip(result.rungs, result.losses, strict=True):
        row = next(line for line in report.splitlines() if line.startswith(f"| {rung.name} |"))
        assert f"| {loss:.4f} |" in row and ("held out" in row) == rung.held_out
    assert fit.formula() in report and f"error {result.held_out_errors[0]:+.4f}" in report
    assert "| N | loss | fit | residual |" in report and "(target)" in report

    assert png_size(result.figure) == (700, 480)  # plot_fit's 7 x 4.8 inches at 100 dpi
    from matplotlib.image import imread

    pixels = imread(result.figure)[..., :3]
    assert (pixels.min(axis=-1) < 0.9).mean() > 0.01  # axes, points and curve: not a blank canvas
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_rerunning_skips_finished_rungs_and_resumes_an_unfinished_one(tiny_ladder, monkeypatch, capsys):
    cfg, result = tiny_ladder
    before = files_state(cfg.out)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished rung was trained again")

    monkeypatch.setattr(train_module, "train", no_training)
    again = run_ladder(cfg, progress=False)
    assert again.losses == result.losses
    assert files_state(cfg.out) == before  # not one byte nor one timestamp changed in the rungs
    assert capsys.readouterr().err.count("finished earlier") == len(result.rungs)
    monkeypatch.undo()

    # The largest rung loses its final checkpoint (as if stopped after step 100): only it resumes, from
    # step 100, and ends where it ended before.
    largest = result.rungs[-1]
    assert largest.steps > 100
    final = cfg.out / largest.name / "checkpoints" / f"step{largest.steps}"
    for path in sorted(final.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    final.rmdir()
    first_rows = metrics_rows(cfg.out / largest.name)[:100]
    resumed = run_ladder(cfg, progress=False)
    assert resumed.losses == result.losses and final.is_dir()
    assert metrics_rows(cfg.out / largest.name)[:100] == first_rows
    after = files_state(cfg.out)
    others = [p for p in before if not str(p).startswith(largest.name)]
    assert all(after[p] == before[p] for p in others)


def test_a_rung_directory_made_with_other_settings_is_refused(tiny_ladder):
    cfg, _ = tiny_ladder
    before = files_state(cfg.out)
    with pytest.raises(ConfigError, match=r"16x1-tpp0\.25: trained with other settings .*seed: 0 -> 1"):
        run_ladder(dataclasses.replace(cfg, seed=1), progress=False)
    assert files_state(cfg.out) == before


def law_losses(rungs, E=1.5, A=40.0, alpha=0.5, B=0.0, beta=0.3):
    return [E + A * r.n**-alpha + (B * r.tokens**-beta if B else 0.0) for r in rungs]


def test_a_ladder_on_an_exact_power_law_predicts_the_held_out_rung_and_the_target(tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, out=tmp_path / "out")
    monkeypatch.setattr(ladder_module, "train_rungs", lambda cfg, rungs, progress: law_losses(rungs))
    result = run_ladder(cfg, progress=False)
    assert abs(result.held_out_errors[0]) < 1e-6
    assert "warning" not in result.report.read_text()
    assert result.target_prediction == pytest.approx(1.5 + 40.0 * naive_n(128, 2) ** -0.5, rel=1e-6)
    assert png_size(result.figure) == (700, 480)


def test_without_held_out_rung_or_target_every_rung_is_fitted_and_nothing_predicted(
    tmp_path, monkeypatch, capsys
):
    cfg = dataclasses.replace(TINY, sizes=TINY.sizes[:3], held_out=False, target=None, out=tmp_path / "out")
    monkeypatch.setattr(ladder_module, "train_rungs", lambda cfg, rungs, progress: law_losses(rungs))
    result = run_ladder(cfg, progress=False)
    assert result.held_out_errors == () and result.target_prediction is None
    report = result.report.read_text()
    assert "held out" not in report and "(target)" not in report
    assert "run train" not in capsys.readouterr().out  # no target to train next


def test_losses_falling_faster_than_a_power_law_are_flagged(tmp_path, monkeypatch, capsys):
    """The default CPU ladder's measured losses: the drop steepens with size, which no E + A N^-alpha
    with E >= 0 follows; the fit runs to alpha's lower bound and E < 0, and says so."""
    cfg = dataclasses.replace(TINY, out=tmp_path / "out")
    monkeypatch.setattr(
        ladder_module, "train_rungs", lambda cfg, rungs, progress: [2.5414, 2.1973, 1.8219, 1.3438]
    )
    result = run_ladder(cfg, progress=False)
    assert result.fit.E < 0
    printed = capsys.readouterr().out
    assert "warning: alpha = 0.01 is at the edge" in printed and "warning: E = " in printed
    assert "warning: alpha" in result.report.read_text()


def test_several_token_multiples_fit_loss_over_size_and_tokens(tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, tokens_per_param=(0.25, 1.0), out=tmp_path / "out")
    monkeypatch.setattr(
        ladder_module, "train_rungs", lambda cfg, rungs, progress: law_losses(rungs, B=30.0, beta=0.4)
    )
    result = run_ladder(cfg, progress=False)
    assert len(result.rungs) == 8 and sum(r.held_out for r in result.rungs) == 2
    assert type(result.fit).__name__ == "ChinchillaFit"
    assert max(abs(e) for e in result.held_out_errors) < 1e-5
    assert "L(N, D)" in result.report.read_text()


def test_losses_that_do_not_fall_leave_the_table_and_a_one_line_error(tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, out=tmp_path / "out")
    monkeypatch.setattr(
        ladder_module, "train_rungs", lambda cfg, rungs, progress: [2.0 + r.n / 1e5 for r in rungs]
    )
    with pytest.raises(ConfigError, match=r"^ladder: fit_power_law: no fit .*ladder\.md\)$"):
        run_ladder(cfg, progress=False)
    report = (cfg.out / "ladder.md").read_text()
    assert "| 16x1-tpp0.25 |" in report and "No fit" in report
    assert not (cfg.out / "ladder.png").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(sizes=("16x1", "32x1", "48x1")), "the fit needs at least 3 sizes plus the held-out"),
        (dict(sizes=("16x1", "32x1", "48")), "size '48' is not D_MODELxN_LAYERS"),
        (dict(sizes=("16x1", "24x1", "32x1", "48x1")), "d_model 24 is not a multiple of head_dim=16"),
        (dict(sizes=("16x1", "16x1", "32x1", "48x1")), "repeat a model size N"),
        (dict(tokens_per_param=()), "tokens_per_param=() must be one or more numbers > 0"),
        (dict(tokens_per_param=(20.0, 20.0)), "repeats a multiple"),
        (dict(target="huge"), "target 'huge' is neither a preset name nor D_MODELxN_LAYERS"),
        (dict(seq_len=0), "seq_len=0 must be >= 1"),
        (dict(warmup_fraction=1.5), "warmup_fraction=1.5 must be in [0, 1]"),
    ],
)
def test_bad_ladder_configs_are_one_line_errors(changes, message):
    with pytest.raises(ConfigError) as exc:
        dataclasses.replace(TINY, **changes)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_the_command_line_builds_the_config_and_describes_every_option(capsys):
    cfg = parse(["ladder", "--sizes", "16x1", "32x1", "48x1", "64x1", "--tokens-per-param", "5", "10"])
    assert cfg == LadderConfig(sizes=("16x1", "32x1", "48x1", "64x1"), tokens_per_param=(5.0, 10.0))
    with pytest.raises(SystemExit):
        parse(["ladder", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(LadderConfig):
        assert f"--{field.name.replace('_', '-')}" in out
    assert "--tokens-per-param [FLOAT [FLOAT ...]] Training tokens per non-embedding parameter" in out
    assert main(["ladder", "--sizes", "16x1", "32x1"]) == 2
    assert capsys.readouterr().err.startswith("error: ladder: sizes holds 2 rung(s)")
