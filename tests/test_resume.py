"""Resuming a run: exact continuation, periodic and async checkpoints, retention, loud refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path

import pytest
import torch

import olmo_fn.train as train_module
from olmo_fn.config import TrainConfig
from olmo_fn.errors import CheckpointError, ConfigError
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.state.checkpoint import list_checkpoints, load_checkpoint, load_params
from olmo_fn.state.checkpoint_writer import CheckpointConfig
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig, lr_at
from olmo_fn.state.train_state import empty_train_state
from olmo_fn.train import train

from faults import stop_after_step

SMALL = dataclasses.replace(
    TrainConfig(),
    model=dataclasses.replace(
        TrainConfig().model, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=128
    ),
    steps=12,
    global_batch_size=4,
    schedule=ScheduleConfig(warmup_steps=3),
    checkpoint=CheckpointConfig(interval=4, keep_last=2),
)
SMALL = dataclasses.replace(SMALL, data=dataclasses.replace(SMALL.data, seq_len=64))


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a digest of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resumed run must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(dataclasses.replace(SMALL, run_dir=str(run_dir)), progress=False)
    return run_dir


def interrupted_run(monkeypatch, cfg: TrainConfig, step: int) -> None:
    """Train `cfg` and stop (as on Ctrl-C) right after update `step`."""

    def interrupt():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        stop_after_step(train_module, step, interrupt, patch.setattr)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_interrupted_run_resumes_exactly(reference, tmp_path, monkeypatch, async_save, micro_batch_size):
    cfg = dataclasses.replace(
        SMALL,
        run_dir=str(tmp_path / "run"),
        checkpoint=dataclasses.replace(SMALL.checkpoint, async_save=async_save),
    )
    if micro_batch_size:
        cfg = dataclasses.replace(cfg, micro_batch_size=micro_batch_size)
    interrupted_run(monkeypatch, cfg, 7)
    assert [s for s, _ in list_checkpoints(cfg.run_dir)] == [4]
    train(cfg, progress=False)
    if micro_batch_size is None:
        assert losses(cfg.run_dir) == losses(reference)  # bit for bit
    else:  # accumulation changes the summation order only
        assert losses(cfg.run_dir) == pytest.approx(losses(reference), rel=1e-5)
    assert [s for s, _ in list_checkpoints(cfg.run_dir)] == [8, 12]
    final = load_checkpoint(
        Path(cfg.run_dir) / "checkpoints/step12", empty_train_state(cfg.model, device="cpu")
    )
    expected = load_checkpoint(reference / "checkpoints/step12", empty_train_state(cfg.model, device="cpu"))
    a, b = flatten(final.params), flatten(expected.params)
    tol = 0 if micro_batch_size is None else 1e-5
    assert all(torch.allclose(a[k], b[k], atol=tol, rtol=tol) for k in a)
    assert (final.data_cursor, final.tokens_seen) == (expected.data_cursor, expected.tokens_seen)


def test_async_and_sync_checkpoints_hold_the_same_tensors(reference, tmp_path):
    cfg = dataclasses.replace(
        SMALL,
        run_dir=str(tmp_path / "run"),
        checkpoint=dataclasses.replace(SMALL.checkpoint, async_save=True),
    )
    train(cfg, progress=False)
    for step in (8, 12):
        template = empty_train_state(cfg.model, device="cpu")
        a = load_checkpoint(Path(cfg.run_dir) / f"checkpoints/step{step}", template)
        b = load_checkpoint(reference / f"checkpoints/step{step}", empty_train_state(cfg.model, device="cpu"))
        fa, fb = flatten(a.opt_state) | flatten(a.params), flatten(b.opt_state) | flatten(b.params)
        assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_retention_keeps_newest_and_permanent(tmp_path):
    cfg = dataclasses.replace(
        SMALL,
        steps=11,
        run_dir=str(tmp_path / "run"),
        checkpoint=CheckpointConfig(interval=2, keep_last=2, permanent_every=4),
    )
    train(cfg, progress=False)
    assert [s for s, _ in list_checkpoints(cfg.run_dir)] == [4, 8, 10, 11]
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == [
        "step10",
        "step11",
        "step4",
        "step8",
    ]


def test_resume_flag_without_a_run_is_an_error(tmp_path):
    cfg = dataclasses.replace(SMALL, run_dir=str(tmp_path / "nothing"), resume=True)
    with pytest.raises(CheckpointError, match="no run to resume"):
        train(cfg, progress=False)
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(ConfigError, match="--resume needs --run-dir"):
        train(dataclasses.replace(SMALL, resume=True), progress=False)


def test_run_without_checkpoint_is_not_silently_restarted(tmp_path, monkeypatch):
    cfg = dataclasses.replace(SMALL, run_dir=str(tmp_path / "run"))
    interrupted_run(monkeypatch, cfg, 2)  # before the first checkpoint, at step 4
    before = snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from"):
        train(cfg, progress=False)
    assert snapshot(tmp_path / "run") == before


def test_math_changing_config_is_refused_then_allowed(reference, tmp_path, monkeypatch):
    cfg = dataclasses.replace(SMALL, run_dir=str(tmp_path / "run"))
    interrupted_run(monkeypatch, cfg, 9)
    before = snapshot(tmp_path / "run")
    annealed = dataclasses.replace(
        cfg, steps=16, optim=OptimConfig(lr=1e-3), schedule=ScheduleConfig(warmup_steps=0, decay="linear")
    )
    with pytest.raises(ConfigError) as info:
        train(annealed, progress=False)
    message = str(info.value)
    for field in ("optim.lr: 0.004 -> 0.001", "steps: 12 -> 16", "schedule.decay", "schedule.warmup_steps"):
        assert field in message
    assert snapshot(tmp_path / "run") == before
    # Runtime-only changes (accumulation, checkpoint cadence) are not math changes.
    runtime_changed = dataclasses.replace(cfg, micro_batch_size=2, checkpoint=CheckpointConfig(interval=1))
    interrupted_run(monkeypatch, runtime_changed, 10)
    assert [s for s, _ in list_checkpoints(cfg.run_dir)] == [8, 9]
    train(dataclasses.replace(annealed, allow_config_change=True), progress=False)
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert [r["loss"] for r in rows[:8]] == losses(reference)[:8]
    new_lr = [lr_at(step, peak=1e-3, cfg=annealed.schedule, total_steps=16) for step in range(9, 16)]
    assert [r["lr"] for r in rows[9:]] == pytest.approx(new_lr)


def test_finished_run_is_left_alone(reference, tmp_path):
    run_dir = tmp_path / "copy"
    cfg = dataclasses.replace(SMALL, run_dir=str(run_dir))
    train(cfg, progress=False)
    before = snapshot(run_dir)
    train(cfg, progress=False)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["truncate shard", "delete shard", "manifest not json", "delete metadata"])
def test_damaged_newest_checkpoint_is_named_and_nothing_changes(tmp_path, monkeypatch, damage):
    cfg = dataclasses.replace(SMALL, run_dir=str(tmp_path / "run"))
    interrupted_run(monkeypatch, cfg, 10)
    newest = tmp_path / "run/checkpoints/step8"
    (shard,) = newest.glob("*.distcp")
    if damage == "truncate shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "delete shard":
        shard.unlink()
    elif damage == "manifest not json":
        (newest / "manifest.json").write_text('{"step": 8,')
    else:
        (newest / ".metadata").unlink()
    before = snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match=str(newest)):
        train(cfg, progress=False)
    assert snapshot(tmp_path / "run") == before


def test_metadata_that_would_run_code_is_refused(tmp_path, reference):
    """DCP's .metadata is a pickle; ours is read with an allow-list, so a planted payload never runs."""
    import shutil

    checkpoint = tmp_path / "step12"
    shutil.copytree(reference / "checkpoints/step12", checkpoint)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="refusing to load pathlib"):
        load_checkpoint(checkpoint, empty_train_state(SMALL.model, device="cpu"))
    assert not marker.exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_checkpoint_loads_into_another_dtype(reference, dtype):
    saved = load_checkpoint(reference / "checkpoints/step12", empty_train_state(SMALL.model, device="cpu"))
    template = empty_train_state(SMALL.model, device="cpu", dtype=dtype).params
    loaded = load_params(reference / "checkpoints/step12", template)
    a, b = flatten(saved.params), flatten(loaded)
    assert all(b[k].dtype == dtype and torch.equal(b[k], a[k].to(dtype)) for k in a)
