"""TrainConfig <-> JSON, and the tyro command line (`python -m olmo_fn.run`)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import orjson
import pytest

from olmo_fn.bench import BenchConfig
from olmo_fn.config import TrainConfig, config_from_dict, config_from_json, config_to_dict
from olmo_fn.errors import ConfigError
from olmo_fn.graph.presets import PRESETS
from olmo_fn.io.loader import DataConfig
from olmo_fn.run import main, parse
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig

CUSTOM = TrainConfig(
    preset="olmo2-14m",
    model=dataclasses.replace(PRESETS["olmo2-14m"], n_layers=2, qk_norm=False, rope_theta=10_000.0),
    data=DataConfig(paths=("a/*.npy", "b.npy"), dtype="uint32", eos_token_id=100_257, seq_len=64),
    optim=OptimConfig(lr=1e-3, no_decay=("embeddings",), implementation="fused"),
    schedule=ScheduleConfig(warmup_steps=3, decay="linear", min_lr_ratio=0.0),
    steps=7,
    global_batch_size=8,
    micro_batch_size=2,
    max_grad_norm=None,
    document_masking=False,
    compile="off",
    run_dir="runs/x",
)
TEMPLATE = dataclasses.replace(CUSTOM, run_dir=None)
"""What --config makes of CUSTOM's file: a template, without the run directory it names."""


def _write_config(path, cfg: TrainConfig):
    path.write_bytes(orjson.dumps(config_to_dict(cfg)))
    return path


# ---- config <-> dict / JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TrainConfig(), CUSTOM], ids=["default", "custom"])
def test_dict_round_trip(cfg):
    assert config_from_dict(TrainConfig, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("cfg", [TrainConfig(), CUSTOM], ids=["default", "custom"])
def test_json_round_trip(cfg, tmp_path):
    """Through JSON, tuples come back as lists and 10000.0 may come back as an int-looking float."""
    loaded = orjson.loads(orjson.dumps(config_to_dict(cfg)))
    assert isinstance(loaded["data"]["paths"], list)
    back = config_from_dict(TrainConfig, loaded)
    assert back == cfg
    assert isinstance(back.data.paths, tuple)
    assert config_from_json(_write_config(tmp_path / "config.json", cfg)) == cfg


def test_int_accepted_for_float_field():
    cfg = config_from_dict(TrainConfig, {"optim": {"lr": 1}, "model": {"rope_theta": 10000}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert isinstance(cfg.model.rope_theta, float)


def test_missing_fields_take_defaults():
    assert config_from_dict(TrainConfig, {}) == TrainConfig()
    assert config_from_dict(TrainConfig, {"steps": 500}) == dataclasses.replace(TrainConfig(), steps=500)


@pytest.mark.parametrize(
    ("data", "where", "name"),
    [
        ({"stepz": 3}, "config", "stepz"),
        ({"optim": {"lrr": 0.1}}, "config.optim", "lrr"),
        ({"model": {"n_layer": 2}}, "config.model", "n_layer"),
        ({"data": {"path": ["a.npy"]}}, "config.data", "path"),
    ],
)
def test_unknown_field(data, where, name):
    with pytest.raises(ConfigError) as info:
        config_from_dict(TrainConfig, data)
    message = str(info.value)
    assert message.startswith(where + ":")
    assert name in message


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        config_from_dict(TrainConfig, {"optim": {"lrr": 0.1}})
    assert "lr" in str(info.value).split("valid", 1)[1]


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"optim": {"lr": "fast"}}, "config.optim.lr"),
        ({"optim": {"lr": True}}, "config.optim.lr"),
        ({"steps": True}, "config.steps"),
        ({"steps": 1.5}, "config.steps"),
        ({"steps": "10"}, "config.steps"),
        ({"micro_batch_size": "4"}, "config.micro_batch_size"),
        ({"max_grad_norm": "1.0"}, "config.max_grad_norm"),
        ({"document_masking": 1}, "config.document_masking"),
        ({"model": {"n_layers": "2"}}, "config.model.n_layers"),
        ({"model": 3}, "config.model"),
        ({"schedule": {"decay": "exponential"}}, "config.schedule.decay"),
        ({"preset": "olmo2-9m"}, "config.preset"),
        ({"data": {"paths": "a.npy", "eos_token_id": 0}}, "config.data.paths"),
        ({"run_dir": 5}, "config.run_dir"),
    ],
)
def test_mistyped_value(data, where):
    with pytest.raises(ConfigError) as info:
        config_from_dict(TrainConfig, data)
    assert str(info.value).startswith(where + ":")


# Tuple fields check their elements too, so a bad path fails here and not later inside glob.
@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"data": {"paths": [1], "eos_token_id": 0}}, "config.data.paths"),
        ({"optim": {"no_decay": ["embeddings", 3]}}, "config.optim.no_decay"),
    ],
)
def test_mistyped_tuple_element(data, where):
    with pytest.raises(ConfigError) as info:
        config_from_dict(TrainConfig, data)
    assert str(info.value).startswith(where)


def test_config_from_json_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match="not found") as info:
        config_from_json(missing)
    assert str(missing) in str(info.value)

    garbage = tmp_path / "garbage.json"
    garbage.write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        config_from_json(garbage)
    assert str(garbage) in str(info.value)

    mistyped = tmp_path / "mistyped.json"
    mistyped.write_bytes(orjson.dumps({"optim": {"lr": "fast"}}))
    with pytest.raises(ConfigError) as info:
        config_from_json(mistyped)
    assert str(info.value).startswith(f"{mistyped}.optim.lr:")


# ---- parse ----------------------------------------------------------------------------------------


def test_parse_without_a_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "train" in err and "bench" in err


def test_parse_train_default():
    assert parse(["train"]) == TrainConfig()


def test_parse_model_override():
    cfg = parse(["train", "--model.n-layers", "2"])
    assert cfg == dataclasses.replace(
        TrainConfig(), model=dataclasses.replace(PRESETS["olmo2-tiny"], n_layers=2)
    )


def test_parse_preset():
    cfg = parse(["train", "--preset", "olmo2-14m"])
    assert cfg.preset == "olmo2-14m"
    assert cfg.model == PRESETS["olmo2-14m"]
    assert cfg == dataclasses.replace(TrainConfig(), preset="olmo2-14m", model=PRESETS["olmo2-14m"])


def test_parse_preset_then_model_override():
    cfg = parse(["train", "--preset=olmo2-14m", "--model.n-layers", "3"])
    assert cfg.preset == "olmo2-14m"
    assert cfg.model == dataclasses.replace(PRESETS["olmo2-14m"], n_layers=3)
    # Order does not matter: the preset is applied first.
    assert parse(["train", "--model.n-layers", "3", "--preset", "olmo2-14m"]) == cfg


def test_parse_bench():
    cfg = parse(["bench", "--preset", "olmo2-1b", "--seq-len", "4096", "--micro-batch", "4"])
    assert isinstance(cfg, BenchConfig)
    assert cfg == BenchConfig(preset="olmo2-1b", model=PRESETS["olmo2-1b"], seq_len=4096, micro_batch_size=4)


def test_parse_data_and_optional_fields():
    cfg = parse(
        [
            "train",
            "--data.paths",
            "a.npy",
            "b/*.npy",
            "--data.eos-token-id",
            "100257",
            "--optim.lr",
            "3e-4",
            "--micro-batch-size",
            "4",
        ]
    )
    assert cfg.data == DataConfig(paths=("a.npy", "b/*.npy"), eos_token_id=100257)
    assert cfg.optim.lr == 3e-4
    assert cfg.micro_batch_size == 4


def test_parse_unknown_preset():
    with pytest.raises(ConfigError) as info:
        parse(["train", "--preset", "olmo2-2b"])
    message = str(info.value)
    assert "olmo2-2b" in message
    assert all(name in message for name in PRESETS)


def test_parse_config_file(tmp_path):
    path = _write_config(tmp_path / "config.json", CUSTOM)
    assert parse(["train", "--config", str(path)]) == TEMPLATE
    assert parse(["train", f"--config={path}"]) == TEMPLATE
    assert parse(["train", "--config", str(path), "--run-dir", "runs/x"]) == CUSTOM


def test_flags_override_the_config_file(tmp_path):
    path = str(_write_config(tmp_path / "config.json", CUSTOM))
    expected = dataclasses.replace(TEMPLATE, steps=3, model=dataclasses.replace(CUSTOM.model, mlp_hidden=256))
    assert parse(["train", "--config", path, "--steps", "3", "--model.mlp-hidden", "256"]) == expected
    assert parse(["train", "--steps", "3", "--model.mlp-hidden", "256", "--config", path]) == expected


def test_preset_flag_replaces_the_model_of_the_config_file(tmp_path):
    path = str(_write_config(tmp_path / "config.json", CUSTOM))
    cfg = parse(["train", "--config", path, "--preset", "olmo2-30m"])
    assert cfg == dataclasses.replace(TEMPLATE, preset="olmo2-30m", model=PRESETS["olmo2-30m"])


def test_config_file_is_only_for_train(tmp_path):
    path = str(_write_config(tmp_path / "config.json", CUSTOM))
    with pytest.raises(ConfigError, match="--config"):
        parse(["bench", "--config", path])


# ---- main, in process ---------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--preset", "nope"], ["'nope'", *PRESETS]),
        (["train", "--model.n-heads", "3"], ["model.n_heads"]),
        (["train", "--data.paths", "/no/such.npy", "--data.eos-token-id", "0"], ["/no/such.npy"]),
        (["train", "--steps", "0"], ["steps=0"]),
    ],
)
def test_main_prints_one_error_line(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert all(word in line for word in expected), line
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == [], "a run that cannot start leaves no run directory"


def test_main_config_that_is_not_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text("preset = 'olmo2-tiny'\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert str(bad) in _one_error_line(capsys.readouterr().err)


def test_main_debug_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.n_heads"):
        main(["train", "--model.n-heads", "3", "--debug"])


def test_main_tiny_run_and_resume_its_config(tmp_path, monkeypatch, capsys):
    """Two steps of training; the run's config.json reads back as the config that was asked for."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--steps", "2", "--schedule.warmup-steps", "1", "--global-batch-size", "2"]
    argv += ["--data.seq-len", "32", "--run-dir", "r"]
    assert main(argv) == 0
    assert "run directory" in capsys.readouterr().err
    saved = tmp_path / "r" / "config.json"
    assert config_from_json(saved) == parse(argv)
    assert parse(["train", "--config", str(saved)]) == dataclasses.replace(parse(argv), run_dir=None)

    # The same run directory again resumes it: here it is finished, so nothing changes.
    before = saved.read_bytes(), (tmp_path / "r" / "metrics.jsonl").read_bytes()
    assert main(["train", "--run-dir", "r"]) == 0
    assert "already trained for 2 of 2 steps" in capsys.readouterr().err
    assert (saved.read_bytes(), (tmp_path / "r" / "metrics.jsonl").read_bytes()) == before
    # ... and a flag that changes the math is refused, in one line, naming the field.
    assert main(["train", "--run-dir", "r", "--seed", "3"]) == 2
    assert "seed: 0 -> 3" in _one_error_line(capsys.readouterr().err)


# ---- the real command line, in subprocesses (about 3 s each: keep them few) -----------------------


def _cli(args: list[str], cwd, cache) -> subprocess.CompletedProcess:
    env = dict(os.environ, OLMO_FN_CACHE=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "olmo_fn.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_help(tmp_path, isolated_cache):
    result = _cli(["--help"], tmp_path, isolated_cache)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "bench" in result.stdout


def test_cli_train_help(tmp_path, isolated_cache):
    result = _cli(["train", "--help"], tmp_path, isolated_cache)
    assert result.returncode == 0, result.stderr
    assert "--model.n-layers" in result.stdout
    assert "--preset" in result.stdout


def test_cli_error_is_one_line_without_traceback(tmp_path, isolated_cache):
    result = _cli(["train", "--preset", "nope"], tmp_path, isolated_cache)
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert "nope" in line and "olmo2-14m" in line
    assert list(tmp_path.iterdir()) == []


def test_cli_debug_shows_the_traceback(tmp_path, isolated_cache):
    result = _cli(["train", "--preset", "nope", "--debug"], tmp_path, isolated_cache)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "ConfigError" in result.stderr
    assert "unknown preset 'nope'" in result.stderr
