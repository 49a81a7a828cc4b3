"""`prepare-data --format prompt-completion | chat` and the loss masks they write: token files and masks
against tokens and flags built here from the records' texts; labels after concat-and-chunk, document
packing and mixing against labels worked out from each row's content; the loss and its gradients
against a float64 reference that sums cross-entropy over completion targets only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from olmo_fn.bench_prepare import train_bpe_tokenizer
from olmo_fn.config import TrainConfig
from olmo_fn.errors import DataError
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.loss import IGNORE_INDEX, cross_entropy_sums
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.byte_tokenizer import BYTE_EOS, BYTE_PAD
from olmo_fn.io.instances import make_batch
from olmo_fn.io.loader import DataConfig, open_training_data
from olmo_fn.io.mixture import SourceConfig
from olmo_fn.io.prepare_data import PrepareDataConfig, run_prepare_data
from olmo_fn.run import main
from olmo_fn.state.schedule import ScheduleConfig
from olmo_fn.state.train_step import StepSettings, make_gradient_fn

import reference as ref

PROMPTS = [
    ("Translate: chat ->", " cat"),
    ("naïve café? ", "ünïcödé ✓ 🚀"),
    ("", "no prompt at all"),
    ("def f(x):\n", "    return x * 2\n"),
]
RECORDS = [{"prompt": f"{i}. {p}", "completion": c} for i in range(6) for p, c in PROMPTS]
CHATS = [
    [("system", "be brief"), ("user", "hi"), ("assistant", "hello!")],
    [("user", "2+2?"), ("assistant", "4"), ("user", "thanks")],  # ends with the user: EOS not trained
    [("user", "a"), ("assistant", ""), ("user", "b"), ("assistant", "ünï")],
]


# ---- helpers: what the files must hold, built from the texts ----------------------------------------


def write_jsonl(path: Path, records: list) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def chat_record(messages) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in messages]}


def framed(pieces: list[tuple[list[int], int]], eos: int, eos_flag: int, bos: int | None):
    """One document's tokens and flags: [BOS (0)] + each piece's ids with its flag + EOS (eos_flag)."""
    tokens = [] if bos is None else [bos]
    flags = [] if bos is None else [0]
    for ids, flag in pieces:
        tokens += ids
        flags += [flag] * len(ids)
    return [*tokens, eos], [*flags, eos_flag]


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def expected_prompt_completion(records, encode=byte_ids, eos=BYTE_EOS, bos=None):
    """[(tokens, flags)] per record: the prompt untrained, the completion and the EOS trained."""
    return [framed([(encode(r["prompt"]), 0), (encode(r["completion"]), 1)], eos, 1, bos) for r in records]


def expected_chat(chats, eos=BYTE_EOS):
    """[(tokens, flags)] per conversation in the documented template."""
    out = []
    for messages in chats:
        pieces = []
        for role, content in messages:
            pieces += [(byte_ids(f"<|{role}|>\n"), 0), (byte_ids(content + "\n"), int(role == "assistant"))]
        out.append(framed(pieces, eos, int(messages[-1][0] == "assistant"), None))
    return out


def concatenated(docs):
    return (
        np.array([t for tokens, _ in docs for t in tokens], np.int64),
        np.array([f for _, flags in docs for f in flags], np.uint8),
    )


def prepare(inputs, out: Path, **kwargs) -> dict:
    kwargs.setdefault("workers", 1)
    cfg = PrepareDataConfig(inputs=tuple(map(str, inputs)), output_dir=str(out), **kwargs)
    return run_prepare_data(cfg, progress=False)


def read_outputs(token_file: Path):
    tokens = np.fromfile(token_file, np.uint16).astype(np.int64)
    return tokens, np.fromfile(f"{token_file}.loss_mask", np.uint8)


def doc_labels(tokens: list[int], flags: list[int]) -> list[int]:
    """The labels of one whole document: the next token where its flag is 1, the last predicts nothing."""
    return [tokens[i + 1] if flags[i + 1] else IGNORE_INDEX for i in range(len(tokens) - 1)] + [IGNORE_INDEX]


# ---- prepare-data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bos", [None, BYTE_PAD])
def test_prompt_completion_files_hold_prompt_then_completion_and_flag_the_completion(tmp_path, bos):
    summary = prepare(
        [write_jsonl(tmp_path / "pc.jsonl", RECORDS)],
        tmp_path / "out",
        format="prompt-completion",
        bos_token_id=bos,
    )
    assert summary["documents"] == len(RECORDS) and summary["malformed_lines"] == 0
    tokens, mask = read_outputs(tmp_path / "out" / "pc.npy")
    want_tokens, want_mask = concatenated(expected_prompt_completion(RECORDS, bos=bos))
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(mask, want_mask)


def test_segments_are_encoded_each_on_its_own_with_a_tokenizer_json(tmp_path):
    texts = [r["prompt"] + r["completion"] for r in RECORDS]
    path = train_bpe_tokenizer(texts * 4, 300, tmp_path / "bpe.json")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    summary = prepare(
        [write_jsonl(tmp_path / "pc.jsonl", RECORDS)],
        tmp_path / "out",
        tokenizer=str(path),
        format="prompt-completion",
    )
    eos = summary["eos_token_id"]

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    tokens, mask = read_outputs(tmp_path / "out" / "pc.npy")
    want_tokens, want_mask = concatenated(expected_prompt_completion(RECORDS, encode, eos=eos))
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(mask, want_mask)
    joined = [encode(t) for t in texts]
    assert any(
        j != encode(r["prompt"]) + encode(r["completion"]) for j, r in zip(joined, RECORDS, strict=True)
    ), "some prompt/completion pair tokenizes differently when joined: the test can tell"


def test_chat_files_use_the_template_and_flag_only_assistant_messages(tmp_path):
    summary = prepare(
        [write_jsonl(tmp_path / "c.jsonl", [chat_record(c) for c in CHATS])], tmp_path / "out", format="chat"
    )
    assert summary["documents"] == len(CHATS)
    tokens, mask = read_outputs(tmp_path / "out" / "c.npy")
    want_tokens, want_mask = concatenated(expected_chat(CHATS))
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(mask, want_mask)
    text = bytes(t for t in tokens.tolist() if t < 256).decode()
    assert text.startswith("<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello!\n")


MALFORMED = {
    "prompt-completion": [
        ({"completion": "x"}, "no 'prompt' field"),
        ({"prompt": 3, "completion": "x"}, "'prompt' is int (3), not a string"),
        ({"prompt": "p", "completion": ["a"]}, '\'completion\' is list (["a"]), not a string'),
        ({"prompt": "p", "completion": ""}, "'completion' is empty"),
    ],
    "chat": [
        ({"text": "x"}, "no 'messages' field"),
        ({"messages": "hi"}, "'messages' is str (\"hi\"), not a list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, 'messages[0].role="bot" is not one of system, user, assistant'),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}, "messages[1].content is int (5), not a string"),
        ({"messages": [{"role": "user"}]}, "messages[0]: no 'content' field"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("fmt", list(MALFORMED))
def test_malformed_records_are_named_by_file_line_field_and_value(tmp_path, fmt, capsys):
    good = RECORDS[0] if fmt == "prompt-completion" else chat_record(CHATS[0])
    cases = MALFORMED[fmt]
    path = write_jsonl(tmp_path / "m.jsonl", [good] + [record for record, _ in cases])
    summary = prepare([path], tmp_path / "out", format=fmt)
    assert summary["documents"] == 1 and summary["malformed_lines"] == len(cases)
    examples = summary["malformed_examples"]
    for line, ((_, reason), example) in enumerate(zip(cases, examples, strict=True), start=2):
        assert example.startswith(f"{path}:{line}: {reason}"), example
    # --strict: the first one stops the command, as one line naming it.
    strict = [
        "prepare-data",
        "--inputs",
        str(path),
        "--output-dir",
        str(tmp_path / "s"),
        "--format",
        fmt,
        "--strict",
    ]
    assert main(strict) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: {path}:2: {cases[0][1]} (prepare.strict is set)"
    assert not list((tmp_path / "s").glob("m.npy*")), "nothing is left of a failed file"


def test_a_text_file_is_refused_in_a_fine_tuning_format(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("one document")
    with pytest.raises(DataError, match=r"doc.txt: prepare.format=chat reads JSON lines"):
        prepare([path], tmp_path / "out", format="chat")


def test_text_outputs_have_no_mask_and_formats_redo_each_other(tmp_path):
    records = [{"text": "plain", "prompt": "p", "completion": "c"}]
    path = write_jsonl(tmp_path / "both.jsonl", records)
    out = tmp_path / "out"
    prepare([path], out)
    assert not (out / "both.npy.loss_mask").exists()
    assert "format" not in orjson.loads((out / "both.npy.done.json").read_bytes()), "text records as before"
    assert prepare([path], out)["files_skipped"] == 1
    assert prepare([path], out, format="prompt-completion")["files_written"] == 1
    np.testing.assert_array_equal(read_outputs(out / "both.npy")[1], [0, 1, 1])
    assert prepare([path], out, format="prompt-completion")["files_skipped"] == 1
    (out / "both.npy.loss_mask").unlink()
    assert prepare([path], out, format="prompt-completion")["files_written"] == 1, "a missing mask is redone"
    assert prepare([path], out)["files_written"] == 1
    assert not (out / "both.npy.loss_mask").exists(), "a stale mask never stays beside text tokens"


# ---- labels ---------------------------------------------------------------------------------------


@pytest.fixture
def sft_file(tmp_path) -> Path:
    prepare([write_jsonl(tmp_path / "pc.jsonl", RECORDS)], tmp_path / "out", format="prompt-completion")
    return tmp_path / "out" / "pc.npy"


def rows_expected_packed(batch, docs, pad=BYTE_PAD):
    """Each packed row's labels worked out from its content: every document found among `docs` by its
    tokens, its labels those of that whole document; padding predicts nothing."""
    by_tokens = {tuple(tokens): (tokens, flags) for tokens, flags in docs}
    expected = torch.full_like(batch.labels, IGNORE_INDEX)
    for row in range(batch.input_ids.shape[0]):
        ids, doc_ids = batch.input_ids[row].tolist(), batch.doc_ids[row]
        for doc in torch.unique(doc_ids).tolist():
            at = torch.nonzero(doc_ids == doc).flatten().tolist()
            piece = [ids[i] for i in at]
            if all(t == pad for t in piece):
                continue
            tokens, flags = by_tokens[tuple(piece)]
            expected[row, at] = torch.tensor(doc_labels(tokens, flags))
    return expected


def rows_expected_chunked(batch, files: list[tuple[np.ndarray, np.ndarray]], seq: int):
    """Each concat-and-chunk row's labels: the row found among the chunks of `files` ((tokens, flags)
    of each) by its tokens; the label of position i is the next token where that token's flag is 1."""
    chunks = {
        tuple(tokens[k : k + seq].tolist()): (tokens, flags, k)
        for tokens, flags in files
        for k in range(0, len(tokens) - seq + 1, seq)
    }
    expected = torch.full_like(batch.labels, IGNORE_INDEX)
    for row in range(batch.input_ids.shape[0]):
        tokens, flags, start = chunks[tuple(batch.input_ids[row].tolist())]
        for i in range(seq - 1):
            if flags[start + i + 1]:
                expected[row, i] = int(tokens[start + i + 1])
    return expected


def test_packed_labels_keep_only_completion_targets_and_travel_with_their_documents(sft_file):
    docs = expected_prompt_completion(RECORDS)
    cfg = DataConfig(
        paths=(str(sft_file),), eos_token_id=BYTE_EOS, pad_token_id=BYTE_PAD, seq_len=48, packing="documents"
    )
    data = open_training_data(cfg, 384, seed=3, total_instances=64)
    batch = data.batch(5, 6)
    assert torch.equal(batch.labels, rows_expected_packed(batch, docs))
    in_batch = [d for d in docs if any(tuple(d[0]) == tuple(r) for r in _doc_pieces(batch))]
    n_completion_targets = sum(sum(flags) for _, flags in in_batch)  # completion tokens + their EOS
    assert int((batch.labels != IGNORE_INDEX).sum()) == n_completion_targets > 0


def _doc_pieces(batch):
    for row in range(batch.input_ids.shape[0]):
        for doc in torch.unique(batch.doc_ids[row]).tolist():
            yield batch.input_ids[row][batch.doc_ids[row] == doc].tolist()


def test_chunked_labels_are_ignored_exactly_where_the_target_is_a_prompt_token(sft_file):
    tokens, flags = concatenated(expected_prompt_completion(RECORDS))
    cfg = DataConfig(paths=(str(sft_file),), eos_token_id=BYTE_EOS, seq_len=16)
    batch = open_training_data(cfg, 384, seed=1, total_instances=32).batch(3, 8)
    assert torch.equal(batch.labels, rows_expected_chunked(batch, [(tokens, flags)], 16))


def test_held_out_evaluation_counts_only_the_targets_training_counts(sft_file):
    """An eval file with a loss mask is scored on its completion targets, as training scores them."""
    from olmo_fn.evaluate import EvalConfig, open_eval_data

    tokens, flags = concatenated(expected_prompt_completion(RECORDS))
    data = DataConfig(paths=(str(sft_file),), eos_token_id=BYTE_EOS, seq_len=16)
    eval_data = open_eval_data(EvalConfig(paths=(str(sft_file),), batch_size=3), data, 384)
    assert eval_data.batches and any((b.labels == -100).any() for b in eval_data.batches)
    for batch in eval_data.batches:
        assert torch.equal(batch.labels, rows_expected_chunked(batch, [(tokens, flags)], 16))


def test_token_files_without_a_mask_train_on_every_target_as_before(sft_file, tmp_path):
    plain = tmp_path / "plain.npy"
    plain.write_bytes(sft_file.read_bytes())
    ones = tmp_path / "ones.npy"
    ones.write_bytes(sft_file.read_bytes())
    Path(f"{ones}.loss_mask").write_bytes(b"\x01" * (ones.stat().st_size // 2))
    for packing in ("concat_chunk", "documents"):
        batches = [
            open_training_data(
                DataConfig(
                    paths=(str(p),), eos_token_id=BYTE_EOS, pad_token_id=BYTE_PAD, seq_len=32, packing=packing
                ),
                384,
                total_instances=8,
            ).batch(0, 4)
            for p in (plain, ones)
        ]
        for field in dataclasses.fields(batches[0]):
            assert torch.equal(getattr(batches[0], field.name), getattr(batches[1], field.name)), (
                packing,
                field,
            )
    chunked = open_training_data(
        DataConfig(paths=(str(plain),), eos_token_id=BYTE_EOS, seq_len=32), 384, total_instances=8
    )
    batch = chunked.batch(0, 4)
    assert torch.equal(batch.labels, make_batch(batch.input_ids, BYTE_EOS).labels)
    assert (batch.labels[:, :-1] != IGNORE_INDEX).all()


@pytest.mark.parametrize("packing", ["concat_chunk", "documents"])
def test_in_a_source_of_masked_and_unmasked_files_only_the_masked_ones_lose_targets(
    sft_file, tmp_path, packing
):
    texts = [f"plain text number {i}, trained on whole" for i in range(24)]
    prepare([write_jsonl(tmp_path / "plain.jsonl", [{"text": t} for t in texts])], tmp_path / "plain")
    plain = tmp_path / "plain" / "plain.npy"
    assert not Path(f"{plain}.loss_mask").exists()
    plain_docs = [framed([(byte_ids(t), 1)], BYTE_EOS, 1, None) for t in texts]  # every target counts
    sft_docs = expected_prompt_completion(RECORDS)
    cfg = DataConfig(
        paths=(str(sft_file), str(plain)),
        eos_token_id=BYTE_EOS,
        pad_token_id=BYTE_PAD,
        seq_len=48,
        packing=packing,
    )
    data = open_training_data(cfg, 384, seed=0, total_instances=64)
    batch = data.batch(0, len(data))
    if packing == "documents":
        expected = rows_expected_packed(batch, sft_docs + plain_docs)
    else:
        expected = rows_expected_chunked(batch, [concatenated(sft_docs), concatenated(plain_docs)], 48)
    assert torch.equal(batch.labels, expected)


def test_masks_of_the_wrong_length_or_with_other_values_are_named(sft_file, tmp_path):
    mask = Path(f"{sft_file}.loss_mask")
    good = mask.read_bytes()
    mask.write_bytes(good[:-1])
    cfg = DataConfig(paths=(str(sft_file),), eos_token_id=BYTE_EOS, seq_len=16)
    with pytest.raises(DataError, match=rf"{mask}: {len(good) - 1} bytes, but .* holds {len(good)} tokens"):
        open_training_data(cfg, 384, total_instances=8)
    mask.write_bytes(b"\x02" + good[1:])
    data = open_training_data(cfg, 384, total_instances=8)
    with pytest.raises(DataError, match=rf"{mask}: value 2 at token offset 0"):
        for cursor in range(len(data)):
            data.batch(cursor, 1)


def test_a_mixture_masks_the_rows_of_its_fine_tuning_source_only(sft_file, tmp_path):
    plain = tmp_path / "plain.npy"
    rng = np.random.default_rng(0)
    rng.integers(0, 256, 64 * 40).astype(np.uint16).tofile(plain)
    tokens, flags = concatenated(expected_prompt_completion(RECORDS))
    cfg = DataConfig(
        sources=(
            SourceConfig("sft", (str(sft_file),), ratio=0.5, max_repetition=100),
            SourceConfig("web", (str(plain),), ratio=0.5, max_repetition=100),
        ),
        eos_token_id=BYTE_EOS,
        seq_len=16,
    )
    data = open_training_data(cfg, 384, seed=2, total_instances=256)
    batch = data.batch(16, 32)
    source = data.source_of(16, 32)
    assert set(source.tolist()) == {0, 1}
    sft_rows = torch.from_numpy(np.flatnonzero(source == 0))
    web_rows = torch.from_numpy(np.flatnonzero(source == 1))
    sft_batch = dataclasses.replace(batch, input_ids=batch.input_ids[sft_rows], labels=batch.labels[sft_rows])
    assert torch.equal(sft_batch.labels, rows_expected_chunked(sft_batch, [(tokens, flags)], 16))
    assert torch.equal(batch.labels[web_rows, :-1], batch.input_ids[web_rows, 1:])


# ---- the loss ---------------------------------------------------------------------------------------

MODEL = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=32, vocab_size=260)


def test_loss_and_gradients_are_those_of_completion_targets_only(sft_file):
    data = open_training_data(
        DataConfig(
            paths=(str(sft_file),),
            eos_token_id=BYTE_EOS,
            pad_token_id=BYTE_PAD,
            seq_len=40,
            packing="documents",
        ),
        MODEL.vocab_size,
        total_instances=8,
    )
    batch = data.batch(0, 2)
    targets = rows_expected_packed(batch, expected_prompt_completion(RECORDS))  # from the texts alone
    is_target = targets != IGNORE_INDEX
    params = ref.perturbed_params(MODEL, seed=3).apply(lambda t: t.detach().requires_grad_(True))
    leaves = flatten(params)

    # The naive reference: cross-entropy summed over completion targets, divided by their number. It
    # reads no other target: scrambling every prompt target first must not change it.
    logits = ref.logits(params, batch.input_ids, batch.positions, batch.doc_ids, MODEL)
    scrambled = torch.where(is_target, targets, torch.randint(0, MODEL.vocab_size, targets.shape))
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, scrambled.clamp(min=0)[..., None])[..., 0]
    n = int(is_target.sum())
    expected_loss = -(log_probs * is_target).sum() / n
    expected_grads = dict(zip(leaves, torch.autograd.grad(expected_loss, list(leaves.values())), strict=True))

    settings = StepSettings(
        model=MODEL,
        optim=TrainConfig().optim,
        schedule=ScheduleConfig(warmup_steps=0),
        total_steps=1,
        micro_batch_size=1,  # the two rows accumulate: each normalised by the whole batch's count
        compute_dtype=torch.float64,
        z_loss=0.0,
    )
    result = make_gradient_fn(settings)(params, batch)
    in_batch = [flags for tokens, flags in expected_prompt_completion(RECORDS) if _in(tokens, batch)]
    assert int(result.n_targets) == n == sum(sum(flags) for flags in in_batch)  # completions + their EOS
    # (float64 throughout, but RoPE tables are fp32 by contract: agreement to about 1e-7)
    assert (result.ce_sum / result.n_targets).item() == pytest.approx(expected_loss.item(), rel=1e-7)
    for path, grad in expected_grads.items():
        torch.testing.assert_close(result.grads[path], grad, rtol=1e-6, atol=1e-8)

    # The loss does not see the predictions at prompt positions: its gradient there is exactly zero,
    # and moving those logits anywhere leaves it as it was.
    seen = logits.detach().requires_grad_(True)
    ce, _, count = cross_entropy_sums(seen, batch.labels)
    (grad,) = torch.autograd.grad(ce / count, seen)
    assert (grad[~is_target] == 0).all() and (grad[is_target].abs().sum(-1) > 0).all()
    moved = seen.detach() + 100 * torch.randn_like(seen) * (~is_target)[..., None]
    assert cross_entropy_sums(moved, batch.labels)[0] == ce


def _in(tokens, batch) -> bool:
    return any(tuple(tokens) == tuple(piece) for piece in _doc_pieces(batch))
