"""`convert to-hf` / `convert from-hf` through the command line, checked against transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from olmo_fn.config import TrainConfig
from olmo_fn.graph import logits
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.loader import DataConfig
from olmo_fn.io.model_source import load_model
from olmo_fn.run import main
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.train import train

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    cfg = dataclasses.replace(
        TrainConfig(),
        steps=3,
        schedule=ScheduleConfig(warmup_steps=1),
        global_batch_size=2,
        data=DataConfig(seq_len=32),
        run_dir=str(tmp / "run"),
    )
    return train(cfg, progress=False)


def test_to_hf_then_transformers_computes_the_same_logits_and_generates(run_dir, tmp_path, gen):
    out = tmp_path / "hf"
    assert main(["convert", "to-hf", str(run_dir), str(out)]) == 0
    ours = load_model(run_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.eos_token_id == 256 and model.config.pad_token_id == 257
    ids = torch.randint(0, 256, (2, 20), generator=gen)
    with torch.no_grad():
        theirs = model(ids).logits
    assert (logits(ours.params, ids, ours.cfg) - theirs).abs().max().item() < 1e-4
    generated = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 25)


def test_from_hf_round_trips_the_parameters(run_dir, tmp_path):
    assert main(["convert", "to-hf", str(run_dir), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    original = load_model(run_dir)
    a, b = flatten(original.params), flatten(back.params)
    assert all(torch.equal(b[k], a[k].to(torch.bfloat16).float()) for k in a)
    assert back.cfg == original.cfg and back.eos_token_id == 256 and back.source == "export"


def test_convert_refusals_are_named(run_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["convert", "to-hf", str(run_dir), str(tmp_path / "full")]) == 2
    assert "not empty; refusing to overwrite" in capsys.readouterr().err
    assert main(["convert", "from-hf", str(run_dir), str(tmp_path / "o")]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "no such model" in capsys.readouterr().err
