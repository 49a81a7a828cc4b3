"""Observers: every hook at its point of the loop, nothing an observer does changes training, and a
failing observer is contained (disabled once) or, for metrics.jsonl, stops the run in one line."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import olmo_fn.io.metrics_log as metrics_log_module
from olmo_fn.callbacks import LogConfig, Observer, ObserverError, ProfileConfig, memory_metrics, state_view
from olmo_fn.config import config_fingerprint, math_differences
from olmo_fn.errors import ConfigError
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.run import parse
from olmo_fn.state.checkpoint import load_checkpoint, read_manifest
from olmo_fn.state.checkpoint_writer import CheckpointConfig
from olmo_fn.state.train_state import empty_train_state, init_train_state

from tiny_run import TINY, run


def final_state(run_dir: Path):
    return load_checkpoint(run_dir / "checkpoints" / "step6", empty_train_state(TINY.model, device="cpu"))


class Recorder(Observer):
    """Keeps everything it is given, in order."""

    name = "recorder"

    def __init__(self):
        self.events: list[tuple] = []
        self.last_params = None

    def on_step(self, view, metrics):
        self.events.append(
            ("step", metrics["step"], dict(metrics), (view.step, view.tokens_seen, view.params_step))
        )
        if metrics["step"] == TINY.steps:
            self.last_params = view.params()

    def on_eval(self, step, metrics):
        self.events.append(("eval", step, dict(metrics)))

    def on_checkpoint(self, step, path):
        self.events.append(("checkpoint", step, Path(path)))

    def on_end(self, summary):
        self.events.append(("end", summary))


def test_every_hook_is_called_at_its_point_with_the_records_of_metrics_jsonl(tmp_path):
    recorder = Recorder()
    run_dir = run(tmp_path, "run", observers=[recorder])
    rows = read_metrics(run_dir / "metrics.jsonl")
    kinds = [(e[0], e[1]) if e[0] != "end" else ("end",) for e in recorder.events]
    assert kinds == [
        *[("step", 1), ("step", 2), ("step", 3), ("eval", 3), ("checkpoint", 3)],
        *[("step", 4), ("step", 5), ("step", 6), ("eval", 6), ("checkpoint", 6), ("end",)],
    ]
    steps = [e for e in recorder.events if e[0] == "step"]
    assert [e[2] for e in steps] == rows  # exactly the records written to metrics.jsonl
    tokens_per_step = TINY.global_batch_size * TINY.data.seq_len
    assert [e[3] for e in steps] == [(s, s * tokens_per_step, s) for s in range(1, 7)]  # CPU: no lag
    evals = [e for e in recorder.events if e[0] == "eval"]
    for _, step, got in evals:
        row = rows[step - 1]
        assert got == {k: row[k] for k in ("eval/val/loss", "eval/val/bpb", "eval/val/tokens")}
    assert [e[2] for e in recorder.events if e[0] == "checkpoint"] == [
        run_dir / "checkpoints" / "step3",
        run_dir / "checkpoints" / "step6",
    ]
    summary = recorder.events[-1][1]
    assert summary["finished"] is True and summary["error"] is None
    assert (summary["step"], summary["tokens_seen"], summary["metrics"]) == (6, 6 * tokens_per_step, rows[-1])
    assert summary["run_dir"] == str(run_dir)
    # The parameters the view copies at the last record are the ones the run saved.
    saved = flatten(final_state(run_dir).params)
    copied = flatten(recorder.last_params)
    assert copied.keys() == saved.keys()
    assert all(torch.equal(copied[k], saved[k]) and not copied[k].requires_grad for k in saved)


class Vandal(Observer):
    """Tries every public way to change the run: writes into the parameter copies (under no_grad,
    so the writes would land on live leaves too), the config copy, the metrics, the view, the summary."""

    name = "vandal"

    def on_step(self, view, metrics):
        with torch.no_grad():
            for tensor in flatten(view.params()).values():
                tensor.mul_(0.0).add_(1.0)
        config = view.config()
        config["seed"] = 99
        config["optim"]["lr"] = 1.0
        object.__setattr__(view, "step", -1)  # past the frozen dataclass: only this view changes
        object.__setattr__(view, "tokens_seen", -1)
        metrics["loss"] = float("nan")  # would stop the run were it the loop's own record
        metrics["step"] = -5
        metrics.clear()

    def on_eval(self, step, metrics):
        metrics.clear()

    def on_end(self, summary):
        summary["metrics"]["loss"] = 0.0
        summary.clear()


class Trespasser(Observer):
    """Writes a field of the frozen view: raises, and is disabled after its first call."""

    name = "trespasser"

    def __init__(self):
        self.calls = 0

    def on_step(self, view, metrics):
        self.calls += 1
        view.step = 0


def test_an_observer_that_attacks_the_run_leaves_training_bit_identical(tmp_path, capsys):
    plain = run(tmp_path, "plain")
    witness, trespasser = Recorder(), Trespasser()
    attacked = run(tmp_path, "attacked", observers=[Vandal(), trespasser, witness])

    a, b = final_state(plain), final_state(attacked)
    tensors_a = flatten(a.params) | {f"opt.{k}": v for k, v in flatten(a.opt_state).items()}
    tensors_b = flatten(b.params) | {f"opt.{k}": v for k, v in flatten(b.opt_state).items()}
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a), "parameters or moments differ"
    assert (a.step, a.tokens_seen, a.data_cursor) == (b.step, b.tokens_seen, b.data_cursor)

    def saved_config(run_dir):
        config = read_manifest(run_dir / "checkpoints" / "step6")["config"]
        return {k: v for k, v in config.items() if k != "run_dir"}

    assert saved_config(plain) == saved_config(attacked)
    assert (
        saved_config(attacked)["seed"] == TINY.seed and saved_config(attacked)["optim"]["lr"] == TINY.optim.lr
    )
    rows_a, rows_b = read_metrics(plain / "metrics.jsonl"), read_metrics(attacked / "metrics.jsonl")
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    # Observers after the vandal still get the untouched records, views and summary.
    assert [e[2] for e in witness.events if e[0] == "step"] == rows_b
    assert [e[3][0] for e in witness.events if e[0] == "step"] == list(range(1, 7))
    evaluated = [{k: v for k, v in rows_b[i].items() if k.startswith("eval/")} for i in (2, 5)]
    assert [e[2] for e in witness.events if e[0] == "eval"] == evaluated
    assert witness.events[-1][1]["metrics"] == rows_b[-1]
    # Writing the frozen view raised: reported once, and the trespasser was not called again.
    assert trespasser.calls == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "trespasser" in line]
    assert len(lines) == 1 and "FrozenInstanceError" in lines[0] and "at step 1" in lines[0]


class Flaky(Observer):
    name = "flaky"

    def __init__(self):
        self.calls = 0
        self.closed = False

    def on_step(self, view, metrics):
        self.calls += 1
        if metrics["step"] == 2:
            raise RuntimeError("lost the connection\nsecond line of the message")

    def on_end(self, summary):
        self.closed = True


def test_a_failing_observer_is_reported_once_and_disabled_and_the_run_goes_on(tmp_path, capsys):
    flaky, after = Flaky(), Recorder()
    run_dir = run(tmp_path, "run", observers=[flaky, after])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "flaky" in line]
    assert lines == [
        "observer flaky failed in on_step at step 2: RuntimeError: lost the connection; "
        "it is disabled for the rest of the run, which goes on"
    ]
    assert "second line" not in err
    assert flaky.calls == 2  # never called again after failing
    assert flaky.closed  # ... but still told the run ended, to close what it opened
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [e[1] for e in after.events if e[0] == "step"] == list(range(1, 7))  # the others go on
    assert after.events[-1][1]["finished"] is True


def test_a_metrics_jsonl_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, monkeypatch):
    write = metrics_log_module.MetricsLog.write

    def failing_write(self, record):
        if record["step"] == 3:
            raise OSError(28, "No space left on device")
        write(self, record)

    monkeypatch.setattr(metrics_log_module.MetricsLog, "write", failing_write)
    recorder = Recorder()
    with pytest.raises(ObserverError) as caught:
        run(tmp_path, "run", observers=[recorder])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("observer metrics.jsonl failed in on_step at step 3: OSError:")
    assert "No space left on device" in message and "the run stops" in message
    run_dir = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    assert not (run_dir / "checkpoints" / "step3").exists()  # it would hold steps without metrics
    summary = recorder.events[-1][1]
    assert summary["finished"] is False and summary["step"] == 2
    assert summary["error"].startswith("ObserverError: observer metrics.jsonl failed")


def test_the_state_view_copies_only_on_demand_and_its_copies_are_detached():
    state = init_train_state(TINY.model, seed=0, device="cpu", config={"seed": 0, "optim": {"lr": 1e-3}})
    view = state_view(5, 123, state)
    # The view holds no tensor: building one per record copies nothing.
    assert not any(isinstance(v, torch.Tensor) for v in vars(view).values())
    live = flatten(state.params)
    before = {k: v.detach().clone() for k, v in live.items()}
    copies = flatten(view.params())
    for key, tensor in copies.items():
        assert torch.equal(tensor, live[key]) and tensor.dtype == torch.float32
        assert not tensor.requires_grad and tensor.data_ptr() != live[key].data_ptr()
        tensor.zero_()
    assert all(torch.equal(live[k], before[k]) for k in live)
    view.config()["optim"]["lr"] = 5.0
    assert state.config["optim"]["lr"] == 1e-3
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.step = 6  # type: ignore[misc]


def _vm_hwm_bytes() -> int:
    """Peak resident memory from /proc (an independent source from getrusage)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_metrics_report_the_peak_resident_memory_in_gib(monkeypatch):
    reported = memory_metrics(torch.device("cpu"))
    reference = _vm_hwm_bytes() / 2**30
    assert set(reported) == {"mem/max_rss_gib"}
    assert reference - 16 / 1024 <= reported["mem/max_rss_gib"] <= reference + 1e-9  # within 16 MiB
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30 + 2**29)
    assert memory_metrics(torch.device("cuda", 0))["mem/cuda_peak_allocated_gib"] == 3.5


def test_memory_figures_are_in_every_record_and_never_fall(tmp_path):
    rows = read_metrics(
        run(tmp_path, "run", steps=3, checkpoint=CheckpointConfig(interval=0)) / "metrics.jsonl"
    )
    peaks = [r["mem/max_rss_gib"] for r in rows]
    assert len(peaks) == 3 and peaks == sorted(peaks) and 0.05 < peaks[0] < _vm_hwm_bytes() / 2**30 + 1e-9


def test_logging_and_profiling_options_are_runtime_fields():
    watched = dataclasses.replace(
        TINY, log=LogConfig(wandb=True, wandb_project="p", tensorboard=True), profile=ProfileConfig("2:3")
    )
    assert config_fingerprint(watched) == config_fingerprint(TINY)
    assert math_differences(TINY, watched) == []


def test_the_command_line_sets_the_logging_and_profiling_options():
    cfg = parse(
        ["train", "--log.wandb", "--log.wandb-project", "proj", "--log.wandb-name", "first",
         "--log.wandb-dir", "/tmp/wb", "--log.tensorboard", "--profile.steps", "10:12"]
    )  # fmt: skip
    assert cfg.log == LogConfig(
        wandb=True, wandb_project="proj", wandb_name="first", wandb_dir="/tmp/wb", tensorboard=True
    )
    assert cfg.profile.range == (10, 12)
    assert parse(["train"]).log == LogConfig() and parse(["train"]).profile.range is None


@pytest.mark.parametrize("text", ["10-12", "12", "0:2", "3:2", "a:b", ":4", "2:"])
def test_a_bad_profile_range_is_one_line_naming_the_field(text):
    with pytest.raises(ConfigError) as caught:
        ProfileConfig(text)
    assert "\n" not in str(caught.value) and f"profile.steps={text!r}" in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (
            {"log": LogConfig(wandb=True)},
            ["--log.wandb needs the wandb package", "pip install 'olmo_fn[wandb]'"],
        ),
        (
            {"log": LogConfig(tensorboard=True)},
            ["--log.tensorboard needs the tensorboard package", "pip install 'olmo_fn[tensorboard]'"],
        ),
        ({"profile": ProfileConfig("5:7")}, ["profile.steps=5:7 ends after the run's last step (steps=6)"]),
    ],
    ids=["wandb", "tensorboard", "profile-range"],
)
def test_an_unusable_logging_option_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, fields, words
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError) as caught:
        run(tmp_path, "run", **fields)
    assert "\n" not in str(caught.value)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert not (tmp_path / "run").exists()
