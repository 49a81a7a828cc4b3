"""A run directory's life through the command line: what starts, resumes, starts afresh or is refused —
and that a refusal changes nothing. Also: runs keep their tokenizer, metrics never trail a checkpoint,
annealing decays from the checkpoint's step, and a full or read-only disk is one clear line."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

import olmo_fn.train as train_module
from olmo_fn.config import TrainConfig
from olmo_fn.errors import ConfigError
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.run import main, parse
from olmo_fn.state.checkpoint_writer import CheckpointWriter

from faults import stop_after_step
from outcomes import last_error_line, one_error_line, snapshot

TINY = [
    "--model.d-model", "32", "--model.n-layers", "2", "--model.n-heads", "2", "--model.n-kv-heads", "2",
    "--model.mlp-hidden", "64", "--data.seq-len", "32", "--global-batch-size", "2",
    "--schedule.warmup-steps", "1", "--eval.interval", "0",
]  # fmt: skip


def tiny(run_dir: Path, *more: str, steps: int = 4, interval: int = 2) -> list[str]:
    return [
        "train",
        *TINY,
        "--steps",
        str(steps),
        "--checkpoint.interval",
        str(interval),
        "--run-dir",
        str(run_dir),
        *more,
    ]


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(tiny(run_dir)) == 0
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    (copy / "config.json").write_bytes(
        orjson.dumps({**orjson.loads((copy / "config.json").read_bytes()), "run_dir": str(copy)})
    )
    return copy


# ---- 5. the directory itself ------------------------------------------------------------------------


def test_run_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    assert main(tiny(target)) == 2
    assert f"--run-dir {target}: exists and is not a directory" in one_error_line(capsys.readouterr().err)
    assert target.read_text() == "mine"


@contextlib.contextmanager
def small_filesystem(path: Path, size: str, *, read_only: bool = False):
    """A tmpfs of `size` mounted at `path` (skips where this machine cannot mount)."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def test_read_only_run_dir_is_one_line_and_changes_nothing(tmp_path, capsys):
    with small_filesystem(tmp_path / "disk", "8m") as disk:
        assert main(tiny(disk / "run")) == 0
        capsys.readouterr()
        before = snapshot(disk)
        remount(disk, "ro")
        assert main(tiny(disk / "run", "--allow-config-change", steps=6)) == 2
        assert f"{disk / 'run'} (read-only file system)" in one_error_line(capsys.readouterr().err)
        assert main(tiny(disk / "new")) == 2
        assert "read-only file system" in one_error_line(capsys.readouterr().err)
        assert snapshot(disk) == before


def test_full_disk_during_a_checkpoint_keeps_the_previous_ones(tmp_path, capsys):
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        run_dir = disk / "run"
        assert main(tiny(run_dir)) == 0
        capsys.readouterr()
        checkpoints = snapshot(run_dir / "checkpoints")
        free = shutil.disk_usage(disk).free
        (disk / "ballast").write_bytes(b"\0" * (free - 64 * 1024))  # leave room for metrics only
        assert main(tiny(run_dir, "--allow-config-change", steps=6)) == 2
        line = last_error_line(capsys.readouterr().err)
        assert f"{run_dir / 'checkpoints/step6'}: writing the checkpoint failed" in line
        assert "intact" in line
        assert snapshot(run_dir / "checkpoints") == checkpoints  # step2, step4 whole; no .step6.tmp
        (disk / "ballast").unlink()
        assert main(tiny(run_dir, "--allow-config-change", steps=6)) == 0  # resumes from step 4
        assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]


# ---- 7, 10, 11. what a run directory may hold ------------------------------------------------------


def test_manifest_without_config_is_one_line(run_copy, capsys):
    manifest_path = run_copy / "checkpoints/step4/manifest.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    del manifest["config"]
    manifest_path.write_bytes(orjson.dumps(manifest))
    before = snapshot(run_copy)
    for argv in (
        [*tiny(run_copy, steps=6, interval=2), "--allow-config-change"],
        ["checkpoint", "info", str(run_copy)],
    ):
        assert main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{manifest_path}: manifest fields are missing or malformed: config (missing)" in line
    assert snapshot(run_copy) == before


def test_deleted_config_json_is_refused_and_can_be_restored(run_copy, capsys):
    (run_copy / "config.json").unlink()
    before = snapshot(run_copy)
    assert main(["train", "--run-dir", str(run_copy)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds checkpoints (newest step4) but no config.json" in line and "--print-config" in line
    assert snapshot(run_copy) == before
    # The fix the message names works: the checkpoint's config becomes config.json again.
    assert main(["checkpoint", "info", str(run_copy), "--print-config"]) == 0
    (run_copy / "config.json").write_text(capsys.readouterr().out)
    assert main(["train", "--run-dir", str(run_copy), "--steps", "6", "--allow-config-change"]) == 0
    assert steps_logged(run_copy) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--optim.lr", "inf"], "optim.lr=inf must be finite"),
        (["--data.paths", "no/such/file.npy", "--data.eos-token-id", "0"], "no/such/file.npy"),
        (
            ["--data.tokenizer", "no/such/tokenizer.json"],
            "data.tokenizer=no/such/tokenizer.json: no such file",
        ),
        (["--model.vocab-size", "200"], "is outside the model's vocabulary"),
    ],
)
def test_a_first_run_that_cannot_start_writes_nothing(tmp_path, capsys, flags, expected):
    assert main(tiny(tmp_path / "run", *flags)) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_token_ids_beyond_the_vocabulary_are_named_before_writing(tmp_path, capsys):
    tokens = tmp_path / "tokens.npy"
    np.arange(600, dtype=np.uint16).tofile(tokens)  # ids up to 599, vocab 384
    assert main(tiny(tmp_path / "run", "--data.paths", str(tokens), "--data.eos-token-id", "0")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tokens) in line and "384" in line
    assert not (tmp_path / "run").exists()


def test_an_attempt_that_failed_before_its_first_step_can_be_started_afresh(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"

    def fail():
        raise MemoryError("out of memory in the first step")

    def failing(*args):
        def step(state, batch):
            fail()

        return step

    with monkeypatch.context() as patch:  # fails inside update 1, before any metrics row
        patch.setattr(train_module, "make_train_step", failing)
        with pytest.raises(MemoryError):
            main(tiny(run_dir, "--seed", "1"))
    assert (run_dir / "config.json").is_file() and steps_logged(run_dir) == []
    capsys.readouterr()
    assert main(tiny(run_dir, "--seed", "2")) == 0  # a different config: a fresh start, said in one line
    err = capsys.readouterr().err
    assert f"starting {run_dir} afresh: it holds no checkpoint and no completed step" in err
    assert steps_logged(run_dir) == [1, 2, 3, 4]
    assert orjson.loads((run_dir / "config.json").read_bytes())["seed"] == 2


def test_completed_steps_without_a_checkpoint_are_not_repeated(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"

    def interrupt():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        stop_after_step(train_module, 2, interrupt, patch.setattr)  # inside update 2: row 1 is written
        assert main(tiny(run_dir, interval=0)) == 130
    capsys.readouterr()
    before = snapshot(run_dir)
    assert main(tiny(run_dir, interval=0)) == 2
    assert "holds 1 completed step(s) in metrics.jsonl but no complete checkpoint" in one_error_line(
        capsys.readouterr().err
    )
    assert snapshot(run_dir) == before


# ---- 12. a config file is a template ----------------------------------------------------------------


def test_config_file_does_not_carry_its_run_directory(finished, tmp_path):
    saved = orjson.loads((finished / "config.json").read_bytes())
    template = tmp_path / "template.json"
    template.write_bytes(orjson.dumps({**saved, "resume": True, "allow_config_change": True}))
    cfg = parse(["train", "--config", str(template), "--seed", "1"])
    assert (cfg.run_dir, cfg.resume, cfg.allow_config_change, cfg.seed) == (None, False, False, 1)
    assert parse(["train", "--config", str(template), "--run-dir", "x"]).run_dir == "x"


def test_a_saved_allow_config_change_is_not_taken_over_on_resume(run_copy, capsys):
    config = orjson.loads((run_copy / "config.json").read_bytes())
    (run_copy / "config.json").write_bytes(orjson.dumps({**config, "allow_config_change": True}))
    assert main(["train", "--run-dir", str(run_copy), "--seed", "5"]) == 2
    assert "seed: 0 -> 5" in one_error_line(capsys.readouterr().err)


# ---- 13. metrics never trail a checkpoint -----------------------------------------------------------


def test_a_checkpoint_lands_after_the_metrics_of_its_steps(tmp_path, monkeypatch):
    """With metrics read one step late (as on CUDA), a kill right after a checkpoint loses no row."""
    monkeypatch.setattr(train_module, "metrics_lag", lambda device: 1)
    save = CheckpointWriter.save

    def save_then_die(self, state):
        save(self, state)
        if state.step == 2:
            raise KeyboardInterrupt  # as abrupt as a kill: nothing after the save runs

    monkeypatch.setattr(CheckpointWriter, "save", save_then_die)
    assert main(tiny(tmp_path / "run")) == 130
    assert steps_logged(tmp_path / "run") == [1, 2]


# ---- 14. the run keeps its tokenizer ---------------------------------------------------------------


def test_the_run_keeps_its_tokenizer(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [
        p.read_text() for p in sorted(Path(__import__("sysconfig").get_paths()["stdlib"]).glob("a*.py"))[:10]
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    work = tmp_path / "work"
    work.mkdir()
    tok.save(str(work / "tok.json"))
    eos = tok.token_to_id("<|endoftext|>")
    ids = np.concatenate([np.array([*tok.encode(t).ids, eos], dtype=np.uint16) for t in texts])
    ids.tofile(work / "tokens.npy")
    monkeypatch.chdir(work)  # the tokenizer is given relative to here
    run_dir = tmp_path / "run"
    assert (
        main(
            tiny(
                run_dir,
                "--data.paths",
                str(work / "tokens.npy"),  # data stays where it is; the tokenizer is copied
                "--data.eos-token-id",
                str(eos),
                "--data.tokenizer",
                "tok.json",
            )
        )
        == 0
    )
    assert (run_dir / "tokenizer.json").read_bytes() == (work / "tok.json").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (work / "tok.json").unlink()  # gone: only the run's copy is left
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "def ", "--max-new-tokens", "3"]) == 0
    assert main(["convert", "to-hf", str(run_dir), "hf"]) == 0
    assert (elsewhere / "hf/tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
    assert main(["checkpoint", "export", str(run_dir), "export"]) == 0
    assert (elsewhere / "export/tokenizer.json").is_file()
    # Resuming from another directory finds it too (the configured relative path no longer exists).
    assert main(["train", "--run-dir", str(run_dir), "--steps", "6", "--allow-config-change"]) == 0


# ---- 15. annealing a finished run ------------------------------------------------------------------


def test_annealing_decays_from_the_checkpoint_step_to_the_new_end(run_copy, capsys):
    """The README's recipe: the new peak at the first added step, linear decay to min_lr_ratio at the end."""
    argv = [
        "train", "--run-dir", str(run_copy), "--steps", "10", "--schedule.start-step", "4",
        "--schedule.warmup-steps", "0", "--schedule.decay", "linear", "--optim.lr", "1e-3", "--allow-config-change",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = read_metrics(run_copy / "metrics.jsonl")
    old = [r["lr"] for r in rows if r["step"] <= 4]
    new = [r["lr"] for r in rows if r["step"] > 4]
    # Written out by hand: updates 4..9 (steps 5..10) fall linearly from 1e-3 to 0.1 * 1e-3.
    expected = [1e-3 + (1e-4 - 1e-3) * k / 5 for k in range(6)]
    assert new == pytest.approx(expected, rel=1e-12)
    # The base run's cosine schedule (1 warmup step, 4 steps) is untouched: peak, peak, midpoint, floor.
    assert old == pytest.approx([4e-3, 4e-3, 4e-4 + 3.6e-3 * 0.5, 4e-4], rel=1e-12)


def test_schedule_start_after_the_resume_step_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    assert (
        main(
            [
                "train",
                "--run-dir",
                str(run_copy),
                "--steps",
                "10",
                "--schedule.start-step",
                "6",
                "--allow-config-change",
            ]
        )
        == 2
    )
    assert "(to anneal from here: --schedule.start-step 4)" in one_error_line(capsys.readouterr().err)
    assert snapshot(run_copy) == before


# ---- 9, 19. the ends of a command -------------------------------------------------------------------


def test_finished_train_prints_where_it_stands_and_what_next(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([*tiny(run_dir), "--eval.interval", "2", "--eval.max-instances", "4"]) == 0
    err = capsys.readouterr().err
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert f"step 4: loss {last['loss']:.4f}, eval/val loss {last['eval/val/loss']:.4f}" in err
    assert f"({last['eval/val/bpb']:.3f} bits/byte)" in err and "this command took" in err
    assert re.search(r"on cpu \(\d+ threads?: [^)]+\)", err)  # the run summary says how many and why
    for command in ("generate --checkpoint", "convert to-hf", "checkpoint info"):
        assert f"python -m olmo_fn.run {command} {run_dir}" in err


def test_info_into_a_closed_pipe_stops_quietly(finished, tmp_path, isolated_cache):
    script = (
        f"{sys.executable} -m olmo_fn.run checkpoint info {finished} 2>{tmp_path / 'err'} | true; "
        "echo ${PIPESTATUS[0]}; "
        f"{sys.executable} -m olmo_fn.run checkpoint info {finished} | head -1"
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    status, first_line = done.stdout.splitlines()
    assert status == "141" and (tmp_path / "err").read_text() == ""
    assert first_line.startswith("checkpoint") and done.stderr == ""


def test_train_config_refuses_warmup_longer_than_the_run():
    with pytest.raises(ConfigError, match="schedule.warmup_steps=50 is longer than the steps=20"):
        TrainConfig(steps=20)
