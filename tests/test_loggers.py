"""W&B (offline), TensorBoard and the profiler: what they write, read back with their own readers,
equals metrics.jsonl; the profiled trace covers the asked steps."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch

import olmo_fn.train as train_module
from olmo_fn.callbacks import LogConfig, ProfileConfig
from olmo_fn.io.metrics_log import read_metrics

from faults import stop_after_step
from tiny_run import TINY, run

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


def interrupted_then_resumed(tmp_path: Path, monkeypatch, **fields) -> Path:
    """A run stopped (Ctrl-C) right after update 5, its records logged up to step 4, then resumed
    from its step-3 checkpoint: step 4 is logged a second time."""
    with monkeypatch.context() as patch:

        def interrupt():
            raise KeyboardInterrupt

        stop_after_step(train_module, 5, interrupt, setattr=patch.setattr)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, "run", **fields)
    return run(tmp_path, "run", **fields)


def logged_numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "step"}


def is_timing(key: str) -> bool:
    """Numbers that measure the machine (speed, waits, memory), not the training math."""
    return key in ("tokens_per_s", "data_wait_s", "eval_s") or key.startswith("mem/")


def math_only(row: dict) -> dict:
    return {k: v for k, v in row.items() if not is_timing(k)}


# --- W&B -------------------------------------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file: a 7-byte header (":W&B", 0xBEE1, version 0), then
    LevelDB-style log blocks of 32 KiB; each chunk has a 7-byte header (CRC32C, length uint16, type:
    1 full, 2 first, 3 middle, 4 last) and the chunks of a record join into one protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    block, pos, pending, records = 32 * 1024, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding at the end of a block or file
            pos += block - pos % block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records: list) -> dict[int, dict]:
    """``{step: {key: value}}`` of the history records, without W&B's own ``_*`` entries."""
    history = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return history


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_offline_logs_every_record_of_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run stays in files
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing under the home directory
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    log = LogConfig(wandb=True, wandb_project="olmo-fn-tests", wandb_name="tiny")
    run_dir = interrupted_then_resumed(tmp_path, monkeypatch, log=log)
    # wandb's service writes a run's offline log after `finish` returns (measured with wandb 0.31: the
    # file can still hold only its 7-byte header then); teardown waits for it, as exiting does.
    import wandb

    wandb.teardown()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    first, second = offline_runs(run_dir)  # one per attempt, continuing one W&B run
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert first.name == second.name == f"run-{run_id}.wandb"

    before, after = wandb_records(first), wandb_records(second)
    history_before, history_after = wandb_history(before), wandb_history(after)
    assert sorted(history_before) == [1, 2, 3, 4]  # stopped after update 5, before its record
    assert sorted(history_after) == [4, 5, 6]  # resumed from the step-3 checkpoint
    by_step = {row["step"]: logged_numbers(row) for row in rows}
    for step in (1, 2, 3):  # metrics.jsonl keeps these records of the first attempt
        assert history_before[step] == by_step[step], step
    for step in (4, 5, 6):
        assert history_after[step] == by_step[step], step
    # The first attempt's lost step 4 had its own timings, and the same math.
    assert history_before[4].keys() == by_step[4].keys()
    assert math_only(history_before[4]) == math_only(by_step[4])

    def run_record(records):
        return next(r.run for r in records if r.WhichOneof("record_type") == "run")

    for records in (before, after):
        meta = run_record(records)
        assert (meta.project, meta.display_name, meta.run_id) == ("olmo-fn-tests", "tiny", run_id)
        config = {item.key: json.loads(item.value_json) for item in meta.config.update}
        assert config["steps"] == TINY.steps and config["log"]["wandb_project"] == "olmo-fn-tests"
    exits = [
        next(r.exit.exit_code for r in recs if r.WhichOneof("record_type") == "exit")
        for recs in (before, after)
    ]
    assert exits == [1, 0]  # the interrupted attempt is marked failed


# --- TensorBoard -----------------------------------------------------------------------------------


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` as TensorBoard's app reads them (its plugin EventAccumulator, which
    also drops what a restart's purge step hides)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["tensors"]:
        steps = [event.step for event in events.Tensors(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice {steps}"
        out[tag] = {e.step: tensor_util.make_ndarray(e.tensor_proto).item() for e in events.Tensors(tag)}
    return out


def test_tensorboard_scalars_equal_metrics_jsonl_and_a_resume_hides_the_lost_steps(tmp_path, monkeypatch):
    run_dir = interrupted_then_resumed(tmp_path, monkeypatch, log=LogConfig(tensorboard=True))
    rows = read_metrics(run_dir / "metrics.jsonl")
    scalars = tensorboard_scalars(run_dir)
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in logged_numbers(row).items():
            expected.setdefault(key, {})[row["step"]] = value
    assert scalars.keys() == expected.keys()
    for key in expected:
        if is_timing(key):  # step 4 of the lost attempt is hidden; steps 1-3 are metrics.jsonl's own
            assert scalars[key].keys() == expected[key].keys(), key
            assert all(scalars[key][s] == expected[key][s] for s in expected[key] if s <= 3), key
        else:
            assert scalars[key] == expected[key], key  # float64: exactly the numbers of metrics.jsonl


# --- the profiler ----------------------------------------------------------------------------------


def label_updates(monkeypatch) -> None:
    """Mark each update in any trace as ``test update N``, N counted from the state it starts from
    (independently of the profiler's own labels)."""
    make = train_module.make_train_step

    def make_labelled(*args):
        step_fn = make(*args)

        def labelled(state, batch):
            with torch.profiler.record_function(f"test update {state.step + 1}"):
                return step_fn(state, batch)

        return labelled

    monkeypatch.setattr(train_module, "make_train_step", make_labelled)


def test_the_profiler_traces_exactly_the_asked_steps_and_changes_nothing(tmp_path, monkeypatch):
    label_updates(monkeypatch)
    plain = run(tmp_path, "plain", steps=4, checkpoint=dataclasses.replace(TINY.checkpoint, interval=0))
    run_dir = run(
        tmp_path,
        "run",
        steps=4,
        checkpoint=dataclasses.replace(TINY.checkpoint, interval=0),
        profile=ProfileConfig("2:3"),
    )
    trace = run_dir / "profile" / "steps2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"]: e for e in events if e.get("name", "").startswith("olmo_fn step")}
    assert sorted(steps) == ["olmo_fn step 2", "olmo_fn step 3"]
    updates = sorted(e["name"] for e in events if e.get("name", "").startswith("test update"))
    assert updates == ["test update 2", "test update 3"]
    # The traced operators lie inside the step windows (the step's matmuls are in them).
    windows = [(s["ts"], s["ts"] + s["dur"]) for s in steps.values()]
    matmuls = [e for e in events if e.get("name") in ("aten::mm", "aten::addmm", "aten::bmm") and "ts" in e]
    for lo, hi in windows:
        assert any(lo <= e["ts"] <= hi for e in matmuls)
    first, last = min(lo for lo, _ in windows), max(hi for _, hi in windows)
    assert all(first <= e["ts"] <= last for e in matmuls)  # nothing of steps 1 or 4
    table = (run_dir / "profile" / "steps2-3.txt").read_text()
    assert table.startswith("olmo_fn profile of steps 2-3") and "Self CPU" in table and "aten::" in table
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl")] for d in (plain, run_dir)]
    assert losses[0] == losses[1]


def test_a_profiler_that_cannot_write_its_trace_is_reported_once_and_training_goes_on(
    tmp_path, monkeypatch, capsys
):
    """The profiler's promise: failing to write is one stderr line, and the run finishes as without it."""
    import torch.profiler

    def cannot_write(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", cannot_write)
    checkpoint = dataclasses.replace(TINY.checkpoint, interval=0)
    plain = run(tmp_path, "plain", steps=4, checkpoint=checkpoint)
    run_dir = run(tmp_path, "run", steps=4, checkpoint=checkpoint, profile=ProfileConfig("2:3"))
    lines = [line for line in capsys.readouterr().err.splitlines() if "profiler" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "training goes on" in lines[0]
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl")] for d in (plain, run_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
