"""Downstream multiple-choice evaluation: scoring against a naive one-row-at-a-time float64 scorer and
against a model with a planted answer; task-file formats and their errors; the built-in next-line
task against the held-out token file; the whole evaluation of an exported model."""

from __future__ import annotations

import io
import re

import numpy as np
import orjson
import pytest
import torch

from olmo_fn.downstream import (
    DownstreamEvalConfig,
    Question,
    evaluate_downstream,
    load_tasks,
    next_line_task,
    read_task,
    run_downstream_eval,
    score_questions,
    start_token_for,
)
from olmo_fn.downstream import scoring as scoring_module
from olmo_fn.errors import ConfigError
from olmo_fn.generate import byte_codec
from olmo_fn.graph import ModelConfig, init_params, logits
from olmo_fn.io.byte_tokenizer import BYTE_EOS
from olmo_fn.io.safetensors_export import export_model
from olmo_fn.io.stdlib_corpus import stdlib_token_file

import reference as ref

TINY = ModelConfig(
    d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48, vocab_size=260, rope_theta=100.0
)
ENCODE = byte_codec().encode


def char_encode(text: str) -> list[int]:
    """A character-level tokenizer: one token per code point, so tokens are not bytes ("é", "🙂")."""
    return [ord(c) % 256 for c in text]


ENCODERS = {"bytes": ENCODE, "chars": char_encode}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is faster than several, and far faster on a busy
    machine. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_params(dtype=torch.float64):
    """Random parameters scaled up, so choices get clearly different log-likelihoods."""
    params = ref.perturbed_params(TINY, seed=5).apply(lambda t: t * 5 if t.ndim == 2 else t)
    return params.apply(lambda t: t.to(dtype))


def varied_questions() -> list[Question]:
    """Contexts and choices of different lengths (so rows need padding), some multi-byte characters."""
    gen = np.random.default_rng(0)
    words = ["def", " f(x)", ":", "\n    return", " x", " + 1", "é", "🙂", " None", "(", ")", " # ok"]
    questions = []
    for i in range(7):
        context = "".join(gen.choice(words, size=1 + 3 * i))
        choices = tuple(
            "".join(gen.choice(words, size=1 + int(gen.integers(0, 6)))) for _ in range(2 + i % 3)
        )
        questions.append(Question(context, choices, int(gen.integers(0, len(choices)))))
    return questions


def naive_log_likelihood(params, cfg, context, choice, encode, start_token=None, max_length=None) -> float:
    """One unbatched float64 forward pass; sums log-softmax at the choice's token positions (context and
    choice encoded apart, which for these tokenizers is the same as together)."""
    context_ids, choice_ids = encode(context), encode(choice)
    ids = ([] if start_token is None else [start_token]) + context_ids + choice_ids
    if max_length is not None:
        ids = ids[-max_length:]
    params64 = params.apply(lambda t: t.double())
    logp = torch.log_softmax(logits(params64, torch.tensor([ids]), cfg)[0].double(), dim=-1)
    first = len(ids) - len(choice_ids)
    return sum(float(logp[p - 1, ids[p]]) for p in range(first, len(ids)))


def naive_scores(params, questions, encode=ENCODE, **kwargs):
    lls = [
        [naive_log_likelihood(params, TINY, q.context, c, encode, **kwargs) for c in q.choices]
        for q in questions
    ]
    chosen = [int(np.argmax(ll)) for ll in lls]
    per_byte = [
        [v / len(c.encode("utf-8")) for v, c in zip(ll, q.choices, strict=True)]
        for ll, q in zip(lls, questions, strict=True)
    ]
    return lls, chosen, [int(np.argmax(v)) for v in per_byte]


# --- scoring ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "tokenizer", "tolerance"),
    [
        (torch.float64, "bytes", dict(abs=1e-9)),
        (torch.float32, "bytes", dict(rel=1e-5, abs=1e-5)),
        (torch.float64, "chars", dict(abs=1e-9)),
    ],
)
def test_scores_equal_a_naive_unbatched_scorer(dtype, tokenizer, tolerance):
    questions = varied_questions()
    params = tiny_params(dtype)
    encode = ENCODERS[tokenizer]
    got = score_questions(params, TINY, questions, encode, batch_size=3, start_token=BYTE_EOS)
    lls, chosen, chosen_norm = naive_scores(params, questions, encode, start_token=BYTE_EOS)
    for got_ll, want_ll in zip(got.log_likelihoods, lls, strict=True):
        assert list(got_ll) == pytest.approx(want_ll, **tolerance)
    assert list(got.chosen) == chosen
    assert list(got.chosen_norm) == chosen_norm
    assert chosen != chosen_norm  # the byte normalisation matters on these questions
    answers = [q.answer for q in questions]
    assert got.accuracy == np.mean(np.array(chosen) == answers)
    assert got.accuracy_norm == np.mean(np.array(chosen_norm) == answers)
    assert got.choice_bytes[0] == tuple(len(c.encode("utf-8")) for c in questions[0].choices)
    assert got.choice_tokens[0] == tuple(len(encode(c)) for c in questions[0].choices)


def test_scores_truncate_from_the_left_like_the_naive_scorer():
    questions = varied_questions()
    params = tiny_params()
    got = score_questions(params, TINY, questions, ENCODE, batch_size=4, max_length=70)
    lls, chosen, _ = naive_scores(params, questions, max_length=70)
    for got_ll, want_ll in zip(got.log_likelihoods, lls, strict=True):
        assert list(got_ll) == pytest.approx(want_ll, abs=1e-9)
    assert list(got.chosen) == chosen
    untruncated = score_questions(params, TINY, questions, ENCODE, batch_size=4, start_token=BYTE_EOS)
    assert untruncated.log_likelihoods[-1] != pytest.approx(got.log_likelihoods[-1], abs=1e-6)


def test_scoring_runs_in_inference_mode_and_in_bfloat16(monkeypatch):
    seen = []
    forward = scoring_module.hidden_states

    def recording(*args, **kwargs):
        seen.append(torch.is_inference_mode_enabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(scoring_module, "hidden_states", recording)
    questions = varied_questions()
    full = score_questions(tiny_params(torch.float32), TINY, questions, ENCODE, start_token=BYTE_EOS)
    half = score_questions(tiny_params(torch.bfloat16), TINY, questions, ENCODE, start_token=BYTE_EOS)
    assert seen and all(seen)
    for a, b in zip(full.log_likelihoods, half.log_likelihoods, strict=True):
        assert list(b) == pytest.approx(a, rel=0.05, abs=0.5)


def test_rows_that_cannot_be_scored_are_config_errors():
    params = tiny_params()
    with pytest.raises(ConfigError, match="question 0 choice 0: the context encodes to no tokens"):
        score_questions(params, TINY, [Question("", ("a", "b"), 0)], ENCODE)
    with pytest.raises(ConfigError, match="question 1 choice 1: the choice is 5 tokens; max_length=5"):
        score_questions(
            params,
            TINY,
            [Question("x", ("a", "b"), 0), Question("x", ("a", "bcdef"), 0)],
            ENCODE,
            max_length=5,
        )
    with pytest.raises(ConfigError, match="token id 300 is outside the model's vocabulary of 260"):
        score_questions(params, TINY, [Question("x", ("a", "b"), 0)], lambda s: [300] * len(s))
    with pytest.raises(ConfigError, match="no questions"):
        score_questions(params, TINY, [], ENCODE)


ALPHABET = "abcdefghijklmnop"
CYCLE_LOGIT = 16 / np.sqrt(1 + 16 * 1e-6)  # RMSNorm of a one-hot of width 16, norm_eps 1e-6, times 4


def cycle_model():
    """A model that has memorised the cycle abc...pabc...: every block adds nothing (zero output
    projections), embeddings are one-hot, and the head gives the next letter of the cycle the logit
    `CYCLE_LOGIT` (4 times the normed one-hot's 4), every other letter 0."""
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=16, vocab_size=16)
    params = init_params(cfg, seed=0, dtype=torch.float64)
    params["blocks", "0", "attention", "w_out"] = torch.zeros(16, 16, dtype=torch.float64)
    params["blocks", "0", "feed_forward", "w2"] = torch.zeros(16, 16, dtype=torch.float64)
    params["embeddings"] = torch.eye(16, dtype=torch.float64)
    successor = torch.zeros(16, 16, dtype=torch.float64)
    successor[(torch.arange(16) + 1) % 16, torch.arange(16)] = 4.0
    params["lm_head", "w_out"] = successor
    return cfg, params


def cycle_encode(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def test_a_model_that_memorised_a_sequence_picks_its_continuation():
    cfg, params = cycle_model()
    # The right continuation, and continuations off the cycle at their first, a middle or the last token.
    questions = [
        Question("abcd", ("efgh", "pabc", "efga", "p"), 0),
        Question("mnop", ("bcd", "abcd", "abce", "aaaa"), 1),
        Question("hij", ("lmn", "kmn", "klo", "k"), 3),
        Question("o", ("pa", "pb", "ab", "ppp"), 0),
    ]
    got = score_questions(params, cfg, questions, cycle_encode, batch_size=3)
    assert got.accuracy == 1.0 and got.accuracy_norm == 1.0
    # Exactly: each token off the cycle costs log(e^L + 15) nats, each token on it log(1 + 15e^-L).
    wrong, right = np.log(np.exp(CYCLE_LOGIT) + 15), np.log1p(15 * np.exp(-CYCLE_LOGIT))
    n_wrong = [(0, 1, 1, 1), (1, 0, 1, 3), (1, 1, 1, 0), (0, 1, 1, 2)]
    for q, ll, counts in zip(questions, got.log_likelihoods, n_wrong, strict=True):
        want = [-k * wrong - (len(c) - k) * right for c, k in zip(q.choices, counts, strict=True)]
        assert list(ll) == pytest.approx(want, rel=1e-12, abs=1e-12)
    mislabelled = [*questions[:3], Question("o", ("pa", "pb", "ab", "ppp"), 2)]
    assert score_questions(params, cfg, mislabelled, cycle_encode).accuracy == 0.75
    tie = score_questions(params, cfg, [Question("o", ("pb", "pa", "pb", "pa"), 3)], cycle_encode)
    assert tie.chosen == tie.chosen_norm == (1,)  # equal scores: the lowest index


# --- task files ---------------------------------------------------------------------------------

ARC_CHOICES = [
    {"text": t, "label": lab} for t, lab in zip(["red", "blue", "green", "black"], "ABCD", strict=True)
]
VALID_LINES = {
    "hellaswag": (
        {"ctx": "A man sits on a roof. He ", "endings": ["falls.", " waves.", "sleeps."], "label": "1"},
        Question("A man sits on a roof. He", (" falls.", " waves.", " sleeps."), 1),
    ),
    "hellaswag-split": (
        {"ctx_a": "A dog runs.", "ctx_b": "it", "endings": ["barks.", "sings."], "label": 0},
        Question("A dog runs. it", (" barks.", " sings."), 0),
    ),
    "arc": (
        {"question": {"stem": "Sky colour?", "choices": ARC_CHOICES}, "answerKey": "B"},
        Question("Question: Sky colour?\nAnswer:", (" red", " blue", " green", " black"), 1),
    ),
    "arc-digits": (
        {
            "question": {
                "stem": "2+1?",
                "choices": [{"text": "2", "label": "1"}, {"text": "3", "label": "2"}],
            },
            "answerKey": 2,
        },
        Question("Question: 2+1?\nAnswer:", (" 2", " 3"), 1),
    ),
    "arc-columns": (
        {"question": "Wet?", "choices": {"text": ["sand", "sea"], "label": ["A", "B"]}, "answerKey": "B"},
        Question("Question: Wet?\nAnswer:", (" sand", " sea"), 1),
    ),
    "piqa": (
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        Question("Question: Open a jar\nAnswer:", (" twist the lid", " eat the lid"), 0),
    ),
    "generic": (
        {"context": "x = 1\n", "choices": ["y = 2", "  = 2", "y"], "answer": 2},
        Question("x = 1\n", ("y = 2", "  = 2", "y"), 2),
    ),
}


def write_lines(path, lines) -> str:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else orjson.dumps(line) for line in lines))
    return str(path)


def test_read_task_parses_every_format_line_by_line(tmp_path):
    records = [record for record, _ in VALID_LINES.values()]
    path = write_lines(tmp_path / "mixed.jsonl", [records[0], b"", b"  ", *records[1:], b""])
    assert read_task(path) == [question for _, question in VALID_LINES.values()]


BAD_LINES = [
    (b'{"context": "x", ', r"not valid JSON \(.*\)"),
    (b"[1, 2]", r"expected a JSON object, got \[1, 2\]"),
    (b'{"text": "hi"}', r"fields text match no task format: expected HellaSwag .*"),
    ({"ctx": "x", "endings": ["a", "b"], "label": 2}, r"label 2 is not a choice index 0..1"),
    ({"ctx": "x", "endings": ["a", "b"], "label": True}, r"label True is not a choice index 0..1"),
    ({"ctx": "x", "endings": "ab", "label": 0}, r"endings 'ab' must be a list of at least 2 strings"),
    ({"ctx": "x", "endings": ["a", " "], "label": 0}, r"endings\[1\] ' ' must be a non-empty string"),
    ({"endings": ["a", "b"], "label": 0}, r"missing field 'ctx_a' \(HellaSwag format\)"),
    ({"ctx": "x", "endings": ["a", "b"]}, r"missing field 'label' \(HellaSwag format\)"),
    (
        {"question": {"stem": "q", "choices": ARC_CHOICES}, "answerKey": "E"},
        r"answerKey 'E' is not one of the choice labels A, B, C, D",
    ),
    (
        {"question": {"choices": ARC_CHOICES}, "answerKey": "A"},
        r"missing field 'stem' \(ARC question format\)",
    ),
    (
        {
            "question": {"stem": "q", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "A"}]},
            "answerKey": "A",
        },
        r"question.choices labels \['A', 'A'\] repeat a label",
    ),
    (
        {"question": {"stem": "q", "choices": "AB"}, "answerKey": "A"},
        r"question.choices 'AB' must be a list of {text, label} objects",
    ),
    ({"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, r"label 2 is not a choice index 0..1"),
    ({"goal": "g", "sol1": "a", "label": 0}, r"missing field 'sol2' \(PIQA format\)"),
    ({"context": "c", "choices": ["a", "b", "c"], "answer": "1"}, r"answer '1' is not a choice index 0..2"),
    ({"context": "c", "choices": ["a", 5], "answer": 0}, r"choices\[1\] 5 must be a non-empty string"),
    (
        {"context": "c", "choices": ["a"], "answer": 0},
        r"choices \['a'\] must be a list of at least 2 strings",
    ),
    ({"context": 3, "choices": ["a", "b"], "answer": 0}, r"context 3 must be a string"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_malformed_lines_are_one_line_config_errors_naming_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "task.jsonl", [VALID_LINES["piqa"][0], b"", line])
    with pytest.raises(ConfigError) as info:
        read_task(path)
    assert re.fullmatch(re.escape(f"{path}:3: ") + message, str(info.value))
    assert "\n" not in str(info.value)


def test_missing_and_empty_task_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.jsonl: no such file"):
        read_task(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r"empty.jsonl: holds no questions"):
        read_task(write_lines(tmp_path / "empty.jsonl", [b"", b" "]))


def test_questions_are_validated():
    with pytest.raises(ConfigError, match="answer 2 is not a choice index 0..1"):
        Question("c", ("a", "b"), 2)
    with pytest.raises(ConfigError, match="at least 2 choices"):
        Question("c", ("a",), 0)
    with pytest.raises(ConfigError, match=r"choices\[1\] is empty"):
        Question("c", ("a", ""), 0)


# --- the built-in next-line task ----------------------------------------------------------------


def validation_documents() -> list[str]:
    """The held-out split's documents, decoded from its byte token file (EOS ends each)."""
    tokens = np.fromfile(stdlib_token_file("validation"), dtype=np.uint16)
    ends = np.flatnonzero(tokens == BYTE_EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].astype(np.uint8).tobytes().decode("utf-8") for s, e in zip(starts, ends, strict=True)]


def test_next_line_answers_are_the_real_next_lines_of_held_out_files():
    questions = next_line_task(30, seed=7, n_choices=5, context_lines=6)
    documents = validation_documents()
    all_lines = [line.strip() for doc in documents for line in doc.split("\n")]
    for q in questions:
        answer = q.choices[q.answer]
        assert len(q.choices) == 5 and q.context.endswith("\n") and q.context.count("\n") <= 6
        assert any(q.context + answer + "\n" in doc or doc.endswith(q.context + answer) for doc in documents)
        assert all_lines.count(answer.strip()) == 1
        others = [c for i, c in enumerate(q.choices) if i != q.answer]
        assert all(c.strip() and c.strip() != answer.strip() for c in others)
        assert len(set(q.choices)) == 5
    assert len({q.answer for q in questions}) > 1


def test_next_line_is_deterministic_per_seed():
    assert next_line_task(10, seed=3) == next_line_task(10, seed=3)
    assert next_line_task(10, seed=3) != next_line_task(10, seed=4)
    with pytest.raises(ConfigError, match="n_choices=1 >= 2"):
        next_line_task(3, seed=0, n_choices=1)


# --- running tasks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tasks=()), "tasks is empty"),
        (dict(tasks=("builtin:nope",)), "unknown built-in task 'builtin:nope'"),
        (dict(tasks=("a/arc.jsonl", "b/arc.jsonl")), "more than one task is named 'arc'"),
        (dict(batch_size=0), "batch_size=0 must be >= 1"),
        (dict(max_questions=0), "max_questions=0 must be >= 1"),
        (dict(max_length=1), "max_length=1 must be >= 2"),
    ],
)
def test_eval_config_is_validated(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DownstreamEvalConfig(checkpoint="x", **kwargs)


def test_questions_start_after_the_tokenizers_bos_or_else_after_eos():
    assert start_token_for(ENCODE, BYTE_EOS) == BYTE_EOS
    assert start_token_for(lambda text: [1, *ENCODE(text)], BYTE_EOS) is None


def test_run_downstream_eval_scores_an_exported_model(tmp_path):
    params = tiny_params(torch.float32)
    model = export_model(
        tmp_path / "model", params, TINY, info={"tokenizer": "bytes", "eos_token_id": BYTE_EOS}
    )
    empty_context = {"context": "", "choices": ["def", "class"], "answer": 0}  # needs the start token
    records = [empty_context] + [record for name, (record, _) in VALID_LINES.items() if name != "generic"]
    task = write_lines(tmp_path / "mine.jsonl", records)
    cfg = DownstreamEvalConfig(
        checkpoint=str(model),
        tasks=(task, "builtin:next-line"),
        max_questions=5,
        builtin_questions=3,
        device="cpu",
        dtype="float32",
        batch_size=7,
    )
    out = io.StringIO()
    metrics = run_downstream_eval(cfg, out)
    tasks = load_tasks([task, "builtin:next-line"], max_questions=5, builtin_questions=3)
    assert [len(q) for q in tasks.values()] == [5, 3]
    expected = {}
    for name, questions in tasks.items():
        result = score_questions(params, TINY, questions, ENCODE, start_token=BYTE_EOS)
        expected[f"downstream/{name}/acc"] = result.accuracy
        expected[f"downstream/{name}/acc_norm"] = result.accuracy_norm
    assert metrics == expected
    assert evaluate_downstream(params, TINY, tasks, ENCODE, start_token=BYTE_EOS, batch_size=2) == expected
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["downstream/mine", "downstream/next-line"]
    assert lines[0].endswith("(5 questions)")


def test_a_merge_across_the_context_choice_boundary_goes_to_the_choice_and_a_bos_is_added_once():
    """With a tokenizer that merges " c" into one token and starts every text with a BOS, the choice's
    tokens are the tail of ``encode(context + choice)`` (the merged token included), and the context
    keeps its one BOS; encoding the choice alone would give other tokens."""
    bos, merged = 900, 901

    def encode(text: str) -> list[int]:
        ids, i = [bos], 0
        while i < len(text):
            if text[i : i + 2] == " c":
                ids.append(merged)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids

    context, choice = "a b ", "cat"  # the context's last space merges with the choice's "c"
    context_ids, choice_ids = scoring_module.split_tokens(encode, context, choice)
    assert context_ids == [bos, ord("a"), ord(" "), ord("b")]
    assert choice_ids == [merged, ord("a"), ord("t")]
    assert context_ids + choice_ids == encode(context + choice)
    assert choice_ids != encode(choice)  # the choice on its own: a BOS, and no merge
