"""Downstream accuracy in the training loop: which runs score which tasks, that the logged accuracy is the
model's (a naive scorer on the saved checkpoint agrees), that it rises as the model learns, and that task
problems stop a run before it writes anything."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

import olmo_fn.in_loop_downstream as in_loop
from olmo_fn.config import TrainConfig, config_from_json
from olmo_fn.downstream import next_line_task
from olmo_fn.downstream.next_line import validation_lines
from olmo_fn.downstream.pmi import pmi_chosen
from olmo_fn.downstream.scoring import ScoreResult
from olmo_fn.errors import ConfigError
from olmo_fn.evaluate import EvalConfig
from olmo_fn.graph import init_params, logits
from olmo_fn.graph.param_tree import flatten
from olmo_fn.in_loop_downstream import downstream_metrics, downstream_specs, open_loop_tasks
from olmo_fn.io.byte_tokenizer import BYTE_EOS
from olmo_fn.io.loader import DataConfig
from olmo_fn.io.metrics_log import read_metrics
from olmo_fn.io.stdlib_corpus import stdlib_token_file
from olmo_fn.parallelize.parallel_config import ParallelConfig
from olmo_fn.run import main
from olmo_fn.state.checkpoint import load_params
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.train import train

from outcomes import one_error_line

QUESTIONS = 8
SHORT = TrainConfig(
    steps=4,
    global_batch_size=4,
    data=DataConfig(seq_len=128),
    schedule=ScheduleConfig(warmup_steps=1),
    eval=EvalConfig(interval=2, max_instances=2, downstream_questions=QUESTIONS),
    threads=1,
)


def naive_log_likelihood(params, cfg, context: str, choice: str, max_length: int) -> float:
    """Sum of log p over the choice's bytes: one unbatched float64 forward pass of [EOS] + context +
    choice, its oldest tokens cut to max_length."""
    ids = [BYTE_EOS, *(context + choice).encode()][-max_length:]
    n = len(choice.encode())
    logp = torch.log_softmax(logits(params, torch.tensor([ids]), cfg)[0].double(), dim=-1)
    return sum(float(logp[p - 1, ids[p]]) for p in range(len(ids) - n, len(ids)))


def naive_accuracy(params, cfg, questions, max_length: int) -> tuple[dict[str, float], int]:
    """({acc, acc_norm, acc_pmi}, how many choices were made between two values within 1e-6)."""
    right = {"acc": 0, "acc_norm": 0, "acc_pmi": 0}
    near_ties = 0
    for q in questions:
        in_context = [naive_log_likelihood(params, cfg, q.context, c, max_length) for c in q.choices]
        alone = [naive_log_likelihood(params, cfg, "", c, max_length) for c in q.choices]
        scores = {
            "acc": in_context,
            "acc_norm": [v / len(c.encode()) for v, c in zip(in_context, q.choices, strict=True)],
            "acc_pmi": [a - b for a, b in zip(in_context, alone, strict=True)],
        }
        for key, values in scores.items():
            best = max(range(len(values)), key=lambda i: (values[i], -i))
            top = sorted(values, reverse=True)
            near_ties += top[0] - top[1] < 1e-6
            right[key] += best == q.answer
    return {key: count / len(questions) for key, count in right.items()}, near_ties


def test_the_default_run_scores_next_line_at_its_eval_steps_and_means_the_saved_model(
    tmp_path, monkeypatch, capsys
):
    cfg = dataclasses.replace(SHORT, run_dir=str(tmp_path / "run"))
    assert cfg.eval.downstream is None and downstream_specs(cfg) == ("builtin:next-line",)
    scored_params = []
    real = in_loop.evaluate_downstream

    def spy(params, model, tasks, encode, **options):
        scored_params.append({k: v.detach().clone() for k, v in flatten(params).items()})
        # The run's byte tokenizer, each question after EOS as a document, rows cut to the sequence.
        assert encode("dé") == list("dé".encode()) and model == cfg.model
        assert options == dict(
            batch_size=16, max_length=128, start_token=BYTE_EOS, device=torch.device("cpu"), pmi=True
        )
        return real(params, model, tasks, encode, **options)

    monkeypatch.setattr(in_loop, "evaluate_downstream", spy)
    run_dir = train(cfg, progress=False)
    assert config_from_json(run_dir / "config.json") == cfg
    rows = read_metrics(run_dir / "metrics.jsonl")
    scored = [r["step"] for r in rows if "downstream/next-line/acc" in r]
    assert scored == [r["step"] for r in rows if "eval/val/loss" in r] == [2, 4]
    for row in rows:
        if row["step"] in scored:
            for key in ("acc", "acc_norm", "acc_pmi"):
                key = f"downstream/next-line/{key}"
                assert row[key] * QUESTIONS == round(row[key] * QUESTIONS) and 0 <= row[key] <= 1
            assert 0 < row["downstream_s"] <= row["eval_s"]

    # The logged accuracy is that of the model the checkpoint holds, on the built-in questions.
    saved = load_params(run_dir / "checkpoints" / "step4", init_params(cfg.model, seed=1))
    assert len(scored_params) == 2 and scored_params[-1].keys() == flatten(saved).keys()
    assert all(torch.equal(scored_params[-1][k], v) for k, v in flatten(saved).items())
    params = saved.apply(lambda t: t.double())
    questions = next_line_task(QUESTIONS, seed=0)
    naive, near_ties = naive_accuracy(params, cfg.model, questions, cfg.data.seq_len)
    assert near_ties == 0  # no choice hangs on rounding: the logged values must equal the naive ones
    assert {
        k.removeprefix("downstream/next-line/"): v for k, v in rows[-1].items() if "next-line" in k
    } == naive

    # `eval` on the run directory scores the same questions the same way.
    argv = ["eval", "--checkpoint", str(run_dir), "--builtin-questions", "8", "--max-length", "128", "--pmi"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(
        f"downstream/next-line: acc {naive['acc']:.4f}  acc_norm {naive['acc_norm']:.4f}  "
        f"acc_pmi {naive['acc_pmi']:.4f}  (8 questions)"
    )


def shuffled_line_task(path: Path, count: int) -> None:
    """Held-out Python lines against three shuffles of their own characters (the same bytes, so the same
    length and unigram statistics): a model that has learnt which bytes follow which tells them apart."""
    rng = random.Random(0)
    lines = []
    for lines_of_file in validation_lines():
        for i, line in enumerate(lines_of_file[3:], start=3):
            text = line.strip()
            if 20 <= len(text) <= 40 and text.isascii() and len(set(text)) > 8:
                lines.append(("".join(x + "\n" for x in lines_of_file[i - 3 : i]), line))
    with path.open("wb") as f:
        for context, line in rng.sample(lines, count):
            indent = line[: len(line) - len(line.lstrip())]
            choices = [line]
            while len(choices) < 4:
                chars = list(line.strip())
                rng.shuffle(chars)
                if indent + "".join(chars) not in choices:
                    choices.append(indent + "".join(chars))
            answer = rng.randrange(4)
            choices[0], choices[answer] = choices[answer], choices[0]
            f.write(orjson.dumps({"context": context, "choices": choices, "answer": answer}) + b"\n")


def test_in_loop_accuracy_rises_above_chance_as_the_model_learns(tmp_path):
    task = tmp_path / "shuffled.jsonl"
    shuffled_line_task(task, 24)
    cfg = dataclasses.replace(
        SHORT,
        steps=30,
        global_batch_size=8,
        data=DataConfig(seq_len=64),
        schedule=ScheduleConfig(warmup_steps=5),
        eval=EvalConfig(interval=30, max_instances=2, downstream=(str(task),), downstream_questions=24),
        run_dir=str(tmp_path / "run"),
    )
    loop = open_loop_tasks(cfg)
    untrained = downstream_metrics(
        init_params(cfg.model, seed=cfg.seed), loop, cfg.model, torch.device("cpu")
    )
    trained = read_metrics(train(cfg, progress=False) / "metrics.jsonl")[-1]
    # Chance is 0.25; 15 of 24 right by chance has a probability of about 1e-4.
    assert untrained["downstream/shuffled/acc"] <= 0.4
    assert trained["downstream/shuffled/acc"] >= 0.6 and trained["downstream/shuffled/acc_norm"] >= 0.6


def test_a_run_on_its_own_data_scores_the_tasks_it_asks_for_without_an_eval_set(tmp_path):
    tokens = str(stdlib_token_file("train"))
    cfg = dataclasses.replace(
        SHORT,
        steps=2,
        data=DataConfig(paths=(tokens,), eos_token_id=BYTE_EOS, seq_len=128),
        eval=EvalConfig(interval=2, downstream=("builtin:next-line",), downstream_questions=4),
        run_dir=str(tmp_path / "run"),
    )
    rows = read_metrics(train(cfg, progress=False) / "metrics.jsonl")
    assert [sorted(k for k in r if k.startswith(("eval/", "downstream/"))) for r in rows] == [
        [],
        ["downstream/next-line/acc", "downstream/next-line/acc_norm", "downstream/next-line/acc_pmi"],
    ]


def test_a_scorer_blind_to_the_context_is_at_chance_on_next_line():
    """Answers and distractors come from one population of lines, so ranking lines by how common their
    bytes are (byte frequencies of the training split), without the context, picks the answer about a
    quarter of the time, whole or per byte."""
    counts = np.bincount(np.fromfile(stdlib_token_file("train"), dtype=np.uint16), minlength=257) + 1.0
    log_freq = np.log(counts / counts.sum())
    questions = next_line_task(500, seed=0)
    for per_byte in (False, True):

        def score(text: str, per_byte=per_byte) -> float:
            values = log_freq[list(text.encode())]
            return values.mean() if per_byte else values.sum()

        right = [max(range(4), key=lambda i: (score(q.choices[i]), -i)) == q.answer for q in questions]
        assert 0.2 <= np.mean(right) <= 0.31  # chance 0.25; one standard deviation is about 0.02


def test_pmi_picks_the_choice_the_context_raises_most():
    def result(lls):
        return ScoreResult(lls, ((1, 1),) * len(lls), ((1, 1),) * len(lls), (0,) * len(lls), (0,) * len(lls),
                           (0,) * len(lls))  # fmt: skip

    in_context = result(((-1.0, -2.0), (-3.0, -1.0), (-2.0, -2.0)))
    alone = result(((-0.5, -3.0), (-4.0, -1.5), (-1.0, -1.0)))
    # pmi: (-0.5, +1.0) -> 1; (+1.0, +0.5) -> 0; (-1.0, -1.0) -> a tie, the first
    assert pmi_chosen(in_context, alone) == (1, 0, 0)


def test_which_runs_score_which_tasks():
    own_data = DataConfig(paths=("tokens/*.npy",), eos_token_id=0)
    assert downstream_specs(TrainConfig()) == ("builtin:next-line",)
    assert downstream_specs(TrainConfig(data=own_data)) == ()
    assert downstream_specs(TrainConfig(eval=EvalConfig(downstream=()))) == ()
    asked = EvalConfig(downstream=("a.jsonl", "builtin:next-line"))
    assert downstream_specs(TrainConfig(data=own_data, eval=asked)) == asked.downstream
    pipelined = TrainConfig(parallel=ParallelConfig(pp=2), micro_batch_size=2)
    assert downstream_specs(pipelined) == ()
    with pytest.raises(
        ConfigError, match=r"eval.downstream=builtin:next-line is not supported under parallel.pp=2"
    ):
        open_loop_tasks(dataclasses.replace(pipelined, eval=EvalConfig(downstream=("builtin:next-line",))))
    assert open_loop_tasks(TrainConfig(eval=EvalConfig(interval=0))) is None


def test_built_in_questions_that_do_not_fit_the_sequence_are_left_out():
    def counts(seq_len, **eval_options):
        loop = open_loop_tasks(TrainConfig(data=DataConfig(seq_len=seq_len), eval=EvalConfig(**eval_options)))
        return None if loop is None else {name: len(q) for name, q in loop.tasks.items()}

    assert counts(256) == {"next-line": 64}
    fitting = [q for q in next_line_task(64, seed=0) if all(len(c.encode()) < 64 for c in q.choices)]
    assert 0 < len(fitting) < 64 and counts(64) == {"next-line": len(fitting)}
    assert counts(16) is None  # the default task fits no question into 16 tokens: not scored
    with pytest.raises(
        ConfigError, match=r"task 'next-line': no question has choices shorter than data.seq_len=16"
    ):
        counts(16, downstream=("builtin:next-line",))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eval.downstream", "builtin:nope"], "eval.downstream: unknown built-in task 'builtin:nope'"),
        (["--eval.downstream", "missing/task.jsonl"], "missing/task.jsonl: no such file"),
        (["--eval.downstream-questions", "0"], "eval.downstream_questions=0 is out of range"),
    ],
)
def test_task_problems_stop_the_run_before_it_writes_anything(tmp_path, capsys, flags, message):
    run_dir = tmp_path / "run"
    assert main(["train", *flags, "--run-dir", str(run_dir)]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not run_dir.exists()


def test_a_task_file_with_a_choice_longer_than_the_sequence_is_refused(tmp_path):
    task = tmp_path / "long.jsonl"
    task.write_bytes(orjson.dumps({"context": "x = ", "choices": ["1" * 70, "2"], "answer": 0}) + b"\n")
    cfg = dataclasses.replace(
        SHORT,
        data=DataConfig(seq_len=64),
        eval=EvalConfig(downstream=(str(task),)),
        run_dir=str(tmp_path / "run"),
    )
    with pytest.raises(
        ConfigError, match=r"^eval.downstream task 'long': question 0 choice 0: the choice is 70"
    ):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_under_fsdp_every_rank_scores_the_gathered_model(tmp_path, isolated_cache):
    """Two processes shard the parameters (FSDP 2); the accuracy they log is that of the whole model their
    checkpoint holds, scored here in one process."""
    args = [
        "-m", "olmo_fn.run", "train",
        "--steps", "2", "--global-batch-size", "4", "--data.seq-len", "128", "--schedule.warmup-steps", "1",
        "--eval.interval", "2", "--eval.max-instances", "2", "--eval.downstream-questions", str(QUESTIONS),
        "--threads", "1", "--run-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    env = {**os.environ, "OLMO_FN_CACHE": str(isolated_cache)}
    env.pop("WORLD_SIZE", None)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run(
        [torchrun, "--nproc-per-node", "2", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "2 processes" in done.stderr
    (row,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_s" in r]
    cfg = config_from_json(tmp_path / "run" / "config.json")
    params = load_params(tmp_path / "run" / "checkpoints" / "step2", init_params(cfg.model, seed=1))
    loop = open_loop_tasks(cfg)
    expected = downstream_metrics(params, loop, cfg.model, torch.device("cpu"))
    assert {k: v for k, v in row.items() if k.startswith("downstream/")} == expected


def test_the_flag_with_no_task_turns_downstream_off_on_the_command_line():
    from olmo_fn.in_loop_downstream import downstream_specs
    from olmo_fn.run import parse

    assert downstream_specs(parse(["train"])) == ("builtin:next-line",)
    assert downstream_specs(parse(["train", "--eval.downstream"])) == ()
