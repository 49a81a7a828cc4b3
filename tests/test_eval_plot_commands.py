"""The `eval` and `plot` commands: parsed from the command line, run, print what they did, and describe
every option in --help."""

from __future__ import annotations

import dataclasses
import re
import struct

import orjson
import pytest

from olmo_fn.downstream import DownstreamEvalConfig, load_tasks, score_questions
from olmo_fn.generate import byte_codec
from olmo_fn.graph import get_preset, init_params
from olmo_fn.io.byte_tokenizer import BYTE_EOS
from olmo_fn.io.safetensors_export import export_model
from olmo_fn.plot import PlotConfig
from olmo_fn.run import main, parse

from outcomes import one_error_line


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        parse([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # help text is wrapped to the terminal


def first_words(doc: str, count: int = 4) -> str:
    return " ".join(doc.split()[:count])


@pytest.mark.parametrize(("command", "config"), [("eval", DownstreamEvalConfig), ("plot", PlotConfig)])
def test_help_describes_every_option(command, config, capsys):
    import ast
    import inspect
    import itertools

    out = help_text(command, capsys)
    # Field docstrings, read from the source: the string statement right after each annotated field.
    body = ast.parse(inspect.getsource(config)).body[0].body
    docs = {
        a.target.id: b.value.value
        for a, b in itertools.pairwise(body)
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
    }
    assert set(docs) == {f.name for f in dataclasses.fields(config)}
    for name, doc in docs.items():
        if name != "runs":  # plot's runs are positional
            assert f"--{name.replace('_', '-')}" in out
        assert first_words(doc) in out, name
    assert "--debug" in out


def test_eval_prints_each_tasks_accuracy(tmp_path, capsys):
    cfg = get_preset("olmo2-tiny")
    params = init_params(cfg, seed=3)
    model = export_model(
        tmp_path / "model", params, cfg, info={"tokenizer": "bytes", "eos_token_id": BYTE_EOS}
    )
    task = tmp_path / "pairs.jsonl"
    task.write_bytes(
        b"\n".join(
            orjson.dumps({"context": f"x = {i}\n", "choices": ["y = 1", "import os"], "answer": i % 2})
            for i in range(6)
        )
    )
    argv = ["eval", "--checkpoint", str(model), "--tasks", str(task), "builtin:next-line"]
    assert main([*argv, "--builtin-questions", "5", "--max-length", "128", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tasks = load_tasks([str(task), "builtin:next-line"], builtin_questions=5)
    assert len(lines) == 2
    for line, (name, questions) in zip(lines, tasks.items(), strict=True):
        result = score_questions(
            params, cfg, questions, byte_codec().encode, start_token=BYTE_EOS, max_length=128
        )
        assert line == (
            f"downstream/{name}: acc {result.accuracy:.4f}  acc_norm {result.accuracy_norm:.4f}  "
            f"({len(questions)} questions)"
        )


def test_eval_of_a_missing_model_is_one_error_line(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert str(tmp_path / "nothing") in one_error_line(capsys.readouterr().err)


def write_run(directory, losses):
    directory.mkdir()
    rows = [{"step": i + 1, "loss": v, "tokens_seen": 100 * (i + 1)} for i, v in enumerate(losses)]
    (directory / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def test_plot_takes_runs_as_arguments_and_writes_the_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", [3.0, 2.0, 1.5])
    write_run(tmp_path / "b", [3.1, 2.5, 2.0])
    out = tmp_path / "curves.png"
    assert (
        main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--metrics", "loss"]) == 0
    )
    assert capsys.readouterr().out.strip() == f"wrote {out} (2 runs, 1 panels)"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (600, 350)


def test_plot_without_runs_or_of_a_missing_run_is_one_error_line(tmp_path, capsys):
    assert main(["plot", "--out", str(tmp_path / "x.png")]) == 2
    assert "plot: runs must not be empty" in one_error_line(capsys.readouterr().err)
    assert main(["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert re.search(r"nope: no such metrics file", one_error_line(capsys.readouterr().err))
    assert not (tmp_path / "x.png").exists()
