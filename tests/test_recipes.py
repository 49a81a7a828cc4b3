"""The recipes in experiments/: their numbers are the published ones, each runs as a program (--help,
flags over the recipe's defaults) and is a --config source for the library's command line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from olmo_fn.config import TrainConfig, config_from_json
from olmo_fn.graph.presets import get_preset
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.ladder import LadderConfig
from olmo_fn.recipe import describe_run, load_recipe, parse_recipe_args, recipe_main
from olmo_fn.run import main, parse
from olmo_fn.state.adamw import decays
from olmo_fn.train import train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TRAIN_RECIPES = ("tiny", "olmo2_1b", "olmo2_7b", "olmo3_7b", "finetune")
RECIPES = (*TRAIN_RECIPES, "ladder")

# Published hyper-parameters, copied from OLMo-core's scripts (not from the recipes):
# src/scripts/train/OLMo2/OLMo2-1B.py, src/scripts/train/OLMo2/OLMo2-7B.py and
# src/scripts/official/OLMo3/OLMo-3-1025-7B-pretrain-1.py; model shapes from TransformerConfig
# olmo2_1B_v2 (16 layers), olmo2_7B and olmo3_7B. dims: d_model, layers, heads, kv heads, MLP hidden.
PUBLISHED = {
    "olmo2_1b": dict(
        lr=4e-4,
        weight_decay=0.033,
        seq_len=4096,
        batch=512,
        tokens=4e12,
        dims=(2048, 16, 16, 16, 8192),
        windows=(),
    ),
    "olmo2_7b": dict(
        lr=3e-4,
        weight_decay=0.1,
        seq_len=4096,
        batch=1024,
        tokens=4e12,
        dims=(4096, 32, 32, 32, 11008),
        windows=(),
    ),
    "olmo3_7b": dict(
        lr=3e-4,
        weight_decay=0.1,
        seq_len=8192,
        batch=512,
        tokens=5e12,
        dims=(4096, 32, 32, 32, 11008),
        windows=(4096, 4096, 4096, 0),
    ),
}
# Common to all three: AdamW betas (0.9, 0.95), 2000 warmup steps, cosine to alpha_f = 0.1, z-loss
# 1e-5, gradient clipping at 1.0, the dolma2 vocabulary padded to 100352, EOS 100257, no weight decay
# on the embeddings (norms decayed), SkipStepAdamW's defaults (rolling_interval_length 128,
# sigma_factor 6).


def recipe_path(name: str) -> Path:
    return EXPERIMENTS / f"{name}.py"


def run_recipe_file(name: str) -> TrainConfig:
    """The recipe's config() as the file itself computes it (run with runpy, not through olmo_fn.recipe)."""
    return runpy.run_path(str(recipe_path(name)))["config"]()


def test_every_recipe_file_exists():
    assert {p.stem for p in EXPERIMENTS.glob("*.py")} >= set(RECIPES)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_has_the_published_hyper_parameters(name):
    cfg, pub = run_recipe_file(name), PUBLISHED[name]
    model = cfg.model
    assert (model.d_model, model.n_layers, model.n_heads, model.n_kv_heads, model.mlp_hidden) == pub["dims"]
    assert model.vocab_size == 100352
    assert (model.block, model.qk_norm, model.rope_theta, model.norm_eps) == (
        "reordered_norm",
        True,
        500_000,
        1e-6,
    )
    assert model.window_pattern == pub["windows"]
    if pub["windows"]:
        assert model.layer_window(model.n_layers - 1) == 0  # OLMo 3: the last layer attends fully
        assert model.layer_window(0) == 4096 and model.layer_window(3) == 0
    assert cfg.data.seq_len == pub["seq_len"]
    assert cfg.global_batch_size == pub["batch"]
    assert cfg.data.eos_token_id == 100257
    assert cfg.optim.name == "adamw" and cfg.optim.lr == pub["lr"]
    assert cfg.optim.weight_decay == pub["weight_decay"]
    assert (cfg.optim.beta1, cfg.optim.beta2) == (0.9, 0.95)
    assert not decays("embeddings", cfg.optim)
    assert decays("blocks.0.attention_norm", cfg.optim) and decays("lm_head.norm", cfg.optim)
    assert decays("blocks.0.attention.w_q", cfg.optim)
    assert (cfg.schedule.warmup_steps, cfg.schedule.decay, cfg.schedule.min_lr_ratio) == (2000, "cosine", 0.1)
    assert (cfg.z_loss, cfg.max_grad_norm) == (1e-5, 1.0)
    # OLMo-core's SkipStepAdamW: 6 sigmas over a window of 128 steps, from max(20, 128 // 2) steps on.
    assert (cfg.spike.sigmas, cfg.spike.window, cfg.spike.min_steps) == (6.0, 128, 64)
    # The step count covers the published token budget with no step to spare.
    tokens_per_step = pub["batch"] * pub["seq_len"]
    assert (cfg.steps - 1) * tokens_per_step < pub["tokens"] <= cfg.steps * tokens_per_step


def test_tiny_recipe_is_the_default_run_the_readme_describes():
    cfg = run_recipe_file("tiny")
    assert cfg == TrainConfig()
    # README: "The 1 M-parameter model takes 600 steps of 16 x 256 tokens".
    assert (cfg.steps, cfg.global_batch_size, cfg.data.seq_len) == (600, 16, 256)
    assert not cfg.data.paths and not cfg.data.sources  # the embedded corpus
    n_params = sum(math.prod(s) for s in _naive_shapes(cfg.model))
    assert 0.9e6 < n_params < 1.1e6


def _naive_shapes(m):
    """Every parameter shape of an untied OLMo 2 model, counted by hand."""
    d, h, kv = m.d_model, m.mlp_hidden, m.n_kv_heads * (m.d_model // m.n_heads)
    block = [(d, d), (kv, d), (kv, d), (d, d), (d,), (kv,), (d,), (h, d), (d, h), (h, d), (d,)]
    return [(m.vocab_size, d)] + block * m.n_layers + [(d,), (m.vocab_size, d)]


@pytest.mark.parametrize("name", TRAIN_RECIPES)
def test_config_flag_loads_the_recipe(name):
    path = str(recipe_path(name))
    expected = run_recipe_file(name)
    assert parse(["train", "--config", path]) == expected
    assert load_recipe(path) == expected
    overridden = parse(["train", "--config", path, "--steps", "2500", "--optim.lr", "1e-3"])
    assert overridden == dataclasses.replace(
        expected, steps=2500, optim=dataclasses.replace(expected.optim, lr=1e-3)
    )


def test_plan_takes_a_recipe_too():
    plan = parse(["plan", "--config", str(recipe_path("olmo3_7b")), "--world-size", "64"])
    cfg = run_recipe_file("olmo3_7b")
    assert (plan.model, plan.data, plan.optim, plan.global_batch_size) == (
        cfg.model,
        cfg.data,
        cfg.optim,
        cfg.global_batch_size,
    )


def _flat_help(text: str) -> str:
    """tyro's boxed help as one line: box drawing and line breaks removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_help_shows_the_recipe_values_as_defaults(name, monkeypatch, capsys):
    path = recipe_path(name)
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_info.value.code == 0
    text = _flat_help(capsys.readouterr().out)
    cfg = run_recipe_file(name)
    doc_first_line = runpy.run_path(str(path))["__doc__"].strip().splitlines()[0]
    assert " ".join(doc_first_line.split()) in text
    assert "experiments/" + path.name in text.split("[-h]")[0]  # usage names the file
    if name == "ladder":
        multiples = re.search(r"--tokens-per-param \[FLOAT \[FLOAT \.\.\.\]\] .*?\(default: ([^)]*)\)", text)
        assert (
            tuple(map(float, multiples.group(1).split()))
            == cfg.tokens_per_param
            != LadderConfig().tokens_per_param
        )
        return
    lr = re.search(r"--optim\.lr FLOAT .*?\(default: ([^)]*)\)", text).group(1)
    steps = re.search(r"--steps INT .*?\(default: ([^)]*)\)", text).group(1)
    assert float(lr) == cfg.optim.lr and int(steps) == cfg.steps
    if name != "tiny":  # not the library's defaults
        assert float(lr) != TrainConfig().optim.lr and int(steps) != TrainConfig().steps


def test_recipe_flags_override_and_preset_replaces_the_model():
    tiny = run_recipe_file("tiny")
    cfg = parse_recipe_args(tiny, ["--steps", "60", "--model.n-layers", "2"], prog="p", description="d")
    assert cfg == dataclasses.replace(tiny, steps=60, model=dataclasses.replace(tiny.model, n_layers=2))
    cfg = parse_recipe_args(
        tiny, ["--preset", "olmo2-14m", "--model.n-layers", "2"], prog="p", description="d"
    )
    assert cfg.preset == "olmo2-14m"
    assert cfg.model == dataclasses.replace(get_preset("olmo2-14m"), n_layers=2)


def test_describe_run_says_what_will_happen():
    text = describe_run(run_recipe_file("olmo2_1b"))
    assert "1,907,349 steps x 512 x 4096 = 2,097,152 per step, 4.00T in all" in text
    assert "lr 0.0004" in text and "2,000 warmup steps" in text and "data/dolma2/*.npy" in text


def test_tiny_recipe_trains_from_the_command_line(tmp_path, isolated_cache):
    run_dir = tmp_path / "run"
    flags = ["--steps", "3", "--schedule.warmup-steps", "1", "--global-batch-size", "2"]
    flags += ["--data.seq-len", "64", "--eval.interval", "0", "--run-dir", str(run_dir)]
    proc = subprocess.run(
        [sys.executable, str(recipe_path("tiny")), *flags],
        cwd=tmp_path,
        env={**os.environ, "OLMO_FN_CACHE": str(isolated_cache), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # It says what it will do before the first step.
    assert (
        proc.stderr.index("will train:")
        < proc.stderr.index("3 steps x 2 x 64")
        < proc.stderr.index("step 1/3")
    )
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    expected = dataclasses.replace(
        run_recipe_file("tiny"),
        steps=3,
        global_batch_size=2,
        run_dir=str(run_dir),
        schedule=dataclasses.replace(TrainConfig().schedule, warmup_steps=1),
        data=dataclasses.replace(TrainConfig().data, seq_len=64),
        eval=dataclasses.replace(TrainConfig().eval, interval=0),
    )
    assert config_from_json(run_dir / "config.json") == expected


BROKEN_RECIPES = {
    "no_function.py": (
        "from olmo_fn.config import TrainConfig\nCONFIG = TrainConfig()\n",
        "must define config()",
    ),
    "wrong_type.py": ("def config():\n    return {'steps': 3}\n", "returned dict, not a TrainConfig"),
    "bad_syntax.py": ("def config(:\n    pass\n", "importing it failed: SyntaxError"),
    "raises.py": (
        "def config():\n    raise ValueError('no data here\\nsecond line')\n",
        "ValueError: no data here",
    ),
    "bad_value.py": (
        "from olmo_fn.config import TrainConfig\ndef config():\n    return TrainConfig(steps=0)\n",
        "steps=0 must be >= 1",
    ),
}


@pytest.mark.parametrize("file_name", sorted(BROKEN_RECIPES))
def test_a_broken_python_config_is_one_line_naming_the_file(file_name, tmp_path, capsys):
    source, message = BROKEN_RECIPES[file_name]
    path = tmp_path / file_name
    path.write_text(source)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert str(path) in err and message in err


def test_a_missing_python_config_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nowhere.py")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nowhere.py'}: config file not found\n"


# ---- the ladder recipe -------------------------------------------------------------------------------
# OLMo-core's ladder (olmo_core.model_ladder.RunDuration) trains every size at multiples 0.5, 1, 2, 5 and
# 10 of Chinchilla's 20 tokens per parameter; the recipe documents the three shortest, 1x first.


def test_ladder_recipe_trains_each_size_at_the_three_shortest_chinchilla_multiples():
    cfg = run_recipe_file("ladder")
    assert isinstance(cfg, LadderConfig)
    assert cfg.tokens_per_param == (20.0, 10.0, 40.0)
    assert cfg.held_out and len(cfg.sizes) == 4 and cfg.target == "olmo2-tiny"
    # "30.4 M tokens in all", counted here from the sizes: N per layer is 4 d^2 (attention) + 3 d h (MLP,
    # h = mlp_ratio d) + 4 d (QK, attention and MLP norms), plus the final norm.
    per_step = cfg.global_batch_size * cfg.seq_len
    total = 0
    for size in cfg.sizes:
        d, layers = map(int, size.split("x"))
        n = layers * (4 * d * d + 3 * d * round(cfg.mlp_ratio * d) + 4 * d) + d
        total += sum(round(m * n / per_step) * per_step for m in cfg.tokens_per_param)
    assert round(total / 1e6, 1) == 30.4


def test_running_the_ladder_recipe_runs_the_ladder(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr("olmo_fn.run.run_ladder", ran.append)
    namespace = runpy.run_path(str(recipe_path("ladder")))
    assert recipe_main(namespace["config"], ["--out", str(tmp_path), "--tokens-per-param", "20"]) == 0
    assert ran == [dataclasses.replace(namespace["config"](), out=tmp_path, tokens_per_param=(20.0,))]
    err = capsys.readouterr().err
    assert "will run the ladder:" in err and "32x2-tpp20" in err and "96x2-tpp20" in err


def test_a_ladder_recipe_is_not_a_train_config(capsys):
    path = recipe_path("ladder")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: {path}: config() returned LadderConfig, not a TrainConfig; run it on its own: python {path}\n"
    )


# ---- the fine-tuning recipe ----------------------------------------------------------------------------
# Tülu 3 SFT (allenai/Llama-3.1-Tulu-3-8B-SFT card, Tülu 3 report): linear schedule to 0, warmup over the
# first 3 % of the steps, no weight decay.


def test_finetune_recipe_starts_from_the_tiny_run_with_the_tulu_schedule():
    cfg = run_recipe_file("finetune")
    assert cfg.init_from == "runs/tiny" and cfg.model == get_preset("olmo2-tiny")
    assert (cfg.schedule.decay, cfg.schedule.min_lr_ratio) == ("linear", 0.0)
    assert cfg.schedule.warmup_steps == round(0.03 * cfg.steps)
    assert cfg.optim.weight_decay == 0.0 and cfg.z_loss == 0.0
    assert cfg.data.packing == "documents" and (cfg.data.eos_token_id, cfg.data.pad_token_id) == (256, 257)


def test_finetune_recipe_trains_on_the_completions_of_prepared_pairs(tmp_path, capsys):
    raw = tmp_path / "sft"
    raw.mkdir()
    records = [
        {"prompt": f"# the sum of {a} and {a + 3}, printed\nprint(", "completion": f"{2 * a + 3})"}
        for a in range(60)
    ]
    (raw / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokens = tmp_path / "tokens"
    assert (
        main(
            [
                "prepare-data",
                "--inputs",
                str(raw / "*.jsonl"),
                "--output-dir",
                str(tokens),
                "--format",
                "prompt-completion",
            ]
        )
        == 0
    )
    # A base of another depth than the recipe's model: --init-from must take the source's model.
    base = train(
        dataclasses.replace(
            TrainConfig(),
            model=dataclasses.replace(TrainConfig().model, n_layers=2),
            steps=2,
            global_batch_size=2,
            schedule=dataclasses.replace(TrainConfig().schedule, warmup_steps=1),
            data=dataclasses.replace(TrainConfig().data, seq_len=64),
            eval=dataclasses.replace(TrainConfig().eval, interval=0),
            run_dir=str(tmp_path / "base"),
        ),
        progress=False,
    )
    capsys.readouterr()
    flags = [
        "--init-from",
        str(base),
        "--data.paths",
        str(tokens / "*.npy"),
        "--steps",
        "2",
        "--schedule.warmup-steps",
        "1",
    ]
    flags += ["--global-batch-size", "4", "--run-dir", str(tmp_path / "ft")]
    assert recipe_main(runpy.run_path(str(recipe_path("finetune")))["config"], flags) == 0
    err = capsys.readouterr().err
    assert err.index("will train:") < err.index(f"starting from the weights of {base}")
    rows = read_metrics(tmp_path / "ft" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # Only completions (and the EOS after each) are targets: a few bytes per example, against prompts of
    # over 25 bytes, so far fewer targets than tokens in the 4 x 256 of a batch.
    completion_targets = sum(len(r["completion"]) + 1 for r in records)
    for row in rows:
        assert 0 < row["n_targets"] <= completion_targets and row["n_targets"] * 5 < 4 * 256
    saved = config_from_json(tmp_path / "ft" / "config.json")
    assert saved.init_from == str(base) and saved.model.n_layers == 2
