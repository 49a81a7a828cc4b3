"""Inputs a new user gets wrong: each is one line naming the file, field and value, exit 2, nothing
written — plus the option spellings and help texts that keep them from getting it wrong."""

from __future__ import annotations

import pytest

from olmo_fn.errors import CheckpointError, ConfigError
from olmo_fn.graph import ModelConfig
from olmo_fn.graph.init import init_params
from olmo_fn.io.hf_checkpoint import write_hf_model
from olmo_fn.io.hf_mapping import model_config_from_hf
from olmo_fn.io.mixture import SourceConfig
from olmo_fn.run import main, parse

from outcomes import one_error_line

CFG = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=32, vocab_size=64)


# ---- 6. mixtures in config files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"name": "web", "ratio": 1.0}, "data.sources[0]: missing required field(s) paths"),
        (
            {"name": "web", "paths": ["x.npy"], "ratio_schedule": [[0.5]]},
            "data.sources[0].ratio_schedule[0]: expected 2 values, got [0.5]",
        ),
        (
            {"name": "web", "paths": ["x.npy"], "ratio_schedule": [0.5, 1.0]},
            "data.sources[0].ratio_schedule[0]: expected a list, got 0.5",
        ),
        ({"name": "web", "paths": "x.npy"}, "data.sources[0].paths: expected a list, got 'x.npy'"),
    ],
)
def test_malformed_mixture_source_is_one_line(tmp_path, capsys, source, expected):
    config = tmp_path / "mix.json"
    config.write_text(f'{{"data": {{"eos_token_id": 0, "sources": [{__import__("json").dumps(source)}]}}}}')
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{config}" in line and expected in line
    assert not (tmp_path / "run").exists()


def test_mixture_source_built_in_a_notebook_checks_its_schedule():
    with pytest.raises(
        ConfigError, match=r"ratio_schedule=\[\[0.5\]\] must be a list of \[fraction, ratio\] pairs"
    ):
        SourceConfig("web", ("x.npy",), ratio_schedule=((0.5,),))
    with pytest.raises(ConfigError, match="ratios must be finite"):
        SourceConfig("web", ("x.npy",), ratio=float("inf"))


# ---- 8, 18. Hugging Face configs --------------------------------------------------------------------


def hf_dir(tmp_path, **config_changes):
    """A real (random) Olmo2 directory whose config.json then gets `config_changes` (None deletes)."""
    import orjson

    out = write_hf_model(tmp_path / "hf", init_params(CFG, seed=0), CFG)
    config = orjson.loads((out / "config.json").read_bytes())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (out / "config.json").write_bytes(orjson.dumps(config))
    return out


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"hidden_size": None}, "missing hidden_size (required to build the model)"),
        ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
        ({"num_hidden_layers": "2"}, "num_hidden_layers='2' must be a positive integer"),
        ({"rms_norm_eps": -1}, "rms_norm_eps=-1 must be a finite positive number"),
        ({"eos_token_id": 64}, "eos_token_id=64 is outside the vocabulary (vocab_size=64)"),
        ({"eos_token_id": [3, 99]}, "eos_token_id=[3, 99] is outside the vocabulary"),
    ],
)
def test_broken_hf_config_is_one_line(tmp_path, capsys, changes, expected):
    source = hf_dir(tmp_path, **changes)
    assert main(["convert", "from-hf", str(source), str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{source / 'config.json'}" in line and expected in line
    assert not (tmp_path / "out").exists()


def test_hf_config_checks_name_the_field_without_a_directory():
    with pytest.raises(CheckpointError, match="num_attention_heads=0"):
        model_config_from_hf({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                              "num_attention_heads": 0, "intermediate_size": 8, "vocab_size": 8})  # fmt: skip


def test_a_valid_eos_is_kept(tmp_path, capsys):
    source = hf_dir(tmp_path, eos_token_id=5)
    assert main(["convert", "from-hf", str(source), str(tmp_path / "out")]) == 0
    import orjson

    assert orjson.loads((tmp_path / "out/config.json").read_bytes())["eos_token_id"] == 5


# ---- 16. help texts and spellings -------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["bench", "--help"]])
def test_help_names_the_options_read_before_parsing(argv, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped to the terminal
    assert "--debug" in out
    if argv[0] in ("--help", "train"):
        assert "--config FILE" in out


def test_bench_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        parse(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--seq-len INT Tokens per sequence" in out and "--micro-batch-size INT Sequences per" in out


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        (
            ["bench", "--micro-batch", "3", "--data.seq-len", "64"],
            ["bench", "--micro-batch-size", "3", "--seq-len", "64"],
        ),
        (
            ["bench", "--micro-batch=3", "--data.seq-len=64"],
            ["bench", "--micro-batch-size", "3", "--seq-len", "64"],
        ),
        (
            ["train", "--micro-batch", "4", "--seq-len", "64"],
            ["train", "--micro-batch-size", "4", "--data.seq-len", "64"],
        ),
    ],
)
def test_either_spelling_works_in_both_commands(alias, canonical):
    assert parse(alias) == parse(canonical)
    assert parse(alias) != parse(canonical[:1])  # the options did change something


def test_compile_on_with_tensor_parallel_is_refused(tmp_path, capsys):
    import torch

    from olmo_fn.runtime import resolve_compile

    run_dir = tmp_path / "run"
    assert main(["train", "--compile", "on", "--parallel.tp", "2", "--run-dir", str(run_dir)]) == 2
    assert "compile=on with parallel.tp > 1 is not supported yet" in one_error_line(capsys.readouterr().err)
    assert not run_dir.exists()
    assert resolve_compile("auto", torch.device("cuda"), tensor_parallel=True) is False  # auto: eager TP
    assert resolve_compile("auto", torch.device("cuda")) is True


def test_evaluation_under_the_zbv_schedule_is_refused_before_anything_starts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--parallel.pp", "2", "--parallel.pp-schedule", "zbv", "--run-dir", str(run_dir)]
    assert main(argv) == 2
    assert "evaluation under parallel.pp_schedule=zbv is not supported" in one_error_line(
        capsys.readouterr().err
    )
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--ac", "budget", "--compile", "off"], "ac=budget is chosen by torch.compile's partitioner"),
        (["--compile", "step", "--parallel.dp-shard", "2"], "compile=step runs in one process"),
    ],
)
def test_speed_options_that_cannot_run_together_are_refused_before_anything_starts(
    tmp_path, capsys, options, expected
):
    run_dir = tmp_path / "run"
    assert main(["train", *options, "--steps", "60", "--run-dir", str(run_dir)]) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not run_dir.exists()
