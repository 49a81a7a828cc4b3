"""Generation: the KV cache against recomputing the whole sequence and against transformers' generate;
sampling rules against naive references and exact distributions; `run_generate` end to end."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from olmo_fn.errors import CheckpointError, ConfigError
from olmo_fn.generate import (
    INCOMPLETE,
    GenerateConfig,
    byte_codec,
    completion_text,
    newly_completed,
    run_generate,
)
from olmo_fn.graph import ModelConfig, logits
from olmo_fn.graph.decode import decode_step, prefill
from olmo_fn.graph.sampling import generate, generate_stream, next_tokens, top_p_filter
from olmo_fn.io.byte_tokenizer import BYTE_EOS, decode_bytes
from olmo_fn.io.model_source import load_model
from olmo_fn.state.schedule import ScheduleConfig

import reference as ref

# A small RoPE theta, so that a token's position changes the logits clearly.
MODELS = {
    "olmo2": ModelConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=48, vocab_size=40, rope_theta=100.0
    ),
    # Windows of 4 in the first two layers: far shorter than prompt + 14 new tokens.
    "olmo3-window": ModelConfig(
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=48,
        vocab_size=40,
        rope_theta=100.0,
        window_pattern=(4, 4, 0),
    ),
    "llama-gqa": ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        mlp_hidden=48,
        vocab_size=40,
        rope_theta=100.0,
        qk_norm=False,
        block="pre_norm",
        norm_eps=1e-5,
    ),
}
PROMPT_LENGTHS = (5, 1, 9)


def model_params(cfg: ModelConfig, seed: int = 3):
    """float64 parameters with norms off 1 and matrices scaled up, so greedy decoding does not settle
    on one token at once (a test over varied tokens can tell more bugs apart)."""
    return ref.perturbed_params(cfg, seed=seed).apply(lambda t: t * 5 if t.ndim == 2 else t)


def random_prompts(cfg: ModelConfig, gen: torch.Generator, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    return [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def greedy_without_cache(params, cfg, prompt, n_new, eos=None) -> list[int]:
    """Argmax decoding that recomputes `logits` over the whole sequence for every new token."""
    ids = list(prompt)
    for _ in range(n_new):
        token = int(logits(params, torch.tensor([ids]), cfg)[0, -1].argmax())
        if token == eos:
            break
        ids.append(token)
    return ids[len(prompt) :]


# --- the KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_with_cache_equals_recomputing_logits(name, gen):
    cfg = MODELS[name]
    params = model_params(cfg)
    prompts = random_prompts(cfg, gen)
    batched = generate(params, cfg, prompts, max_new_tokens=14, eos_token_id=None)
    for prompt, tokens in zip(prompts, batched, strict=True):
        assert tokens == greedy_without_cache(params, cfg, prompt, 14)
        assert [tokens] == generate(params, cfg, [prompt], max_new_tokens=14, eos_token_id=None)
        assert len(set(tokens)) >= 2
    assert len({t for tokens in batched for t in tokens}) >= 6  # varied enough to show a wrong cache


def test_sliding_window_applies_while_decoding(gen):
    """The same weights without windows decode differently, so the test above sees the window."""
    cfg = MODELS["olmo3-window"]
    params = model_params(cfg)
    prompts = random_prompts(cfg, gen)
    windowed = generate(params, cfg, prompts, max_new_tokens=14, eos_token_id=None)
    full = generate(
        params, dataclasses.replace(cfg, window_pattern=()), prompts, max_new_tokens=14, eos_token_id=None
    )
    assert windowed != full


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_logits_equal_full_logits_at_every_position(name, gen):
    """Left-padded batch: prefill a prompt per row, then feed a continuation one token at a time."""
    cfg = MODELS[name]
    params = model_params(cfg)
    prompts = random_prompts(cfg, gen, lengths=(3, 7))
    continuation = torch.randint(0, cfg.vocab_size, (2, 8), generator=gen)
    step_logits, cache = prefill(params, cfg, prompts, capacity=7 + 8)
    got = [step_logits]
    for i in range(8):
        step_logits, cache = decode_step(params, cfg, cache, continuation[:, i])
        got.append(step_logits)
    assert cache.length == cache.capacity == 15
    for row, prompt in enumerate(prompts):
        full = logits(params, torch.tensor([prompt + continuation[row].tolist()]), cfg)[0]
        expected = full[len(prompt) - 1 :]  # the logits after the prompt's last token and after each fed one
        torch.testing.assert_close(torch.stack([g[row] for g in got]), expected, atol=1e-9, rtol=1e-9)


def test_decoding_past_capacity_is_refused():
    cfg = MODELS["olmo2"]
    params = model_params(cfg)
    _, cache = prefill(params, cfg, [[1, 2, 3]], capacity=3)
    with pytest.raises(ValueError, match="capacity of 3"):
        decode_step(params, cfg, cache, torch.tensor([4]))


# --- against transformers ----------------------------------------------------------------------


def random_hf_model(arch: str, vocab_size: int):
    transformers = pytest.importorskip("transformers")
    config_cls, sizes = {
        "olmo2": (transformers.Olmo2Config, dict(num_hidden_layers=2, num_key_value_heads=2, rope_theta=1e4)),
        "olmo3": (
            transformers.Olmo3Config,
            dict(num_hidden_layers=3, num_key_value_heads=1, sliding_window=5),
        ),
        "llama": (
            transformers.LlamaConfig,
            dict(num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e4),
        ),
        # RoPE scaled for a context longer than the 8 positions "trained": the 22 generated reach beyond
        "llama-rope-llama3": (
            transformers.LlamaConfig,
            dict(
                num_hidden_layers=2,
                num_key_value_heads=2,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 1e4,
                    "factor": 4.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8,
                },
            ),
        ),
        "qwen3-rope-yarn": (
            transformers.Qwen3Config,
            dict(
                num_hidden_layers=2,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=32,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 1e4,
                    "factor": 4.0,
                    "original_max_position_embeddings": 8,
                },
            ),
        ),
    }[arch]
    config = config_cls(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        vocab_size=vocab_size,
        attn_implementation="eager",
        eos_token_id=None,  # no early stop: compare the whole run
        pad_token_id=None,
        bos_token_id=None,
        **sizes,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms off 1, larger weights: varied tokens
        for param in model.parameters():
            param.add_(0.5 * torch.randn_like(param)) if param.ndim == 1 else param.mul_(5)
    return model


@pytest.mark.parametrize("arch", ["olmo2", "olmo3", "llama", "llama-rope-llama3", "qwen3-rope-yarn"])
def test_greedy_equals_transformers_generate(arch, tmp_path, gen):
    model = random_hf_model(arch, vocab_size=96)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    loaded = load_model(tmp_path / "hf")
    assert loaded.source == "huggingface"
    ids = torch.randint(0, 96, (2, 6), generator=gen)
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16
        )
    got = generate(loaded.params, loaded.cfg, ids.tolist(), max_new_tokens=16, eos_token_id=None)
    assert got == expected[:, 6:].tolist()
    assert all(len(set(row)) >= 3 for row in got)


# --- sampling ---------------------------------------------------------------------------------


def test_top_k_1_and_tiny_top_p_equal_greedy(gen):
    scores = torch.randn(64, 50, generator=gen, dtype=torch.float64) * 3
    greedy = next_tokens(scores)
    assert torch.equal(greedy, scores.argmax(-1))
    sampler = torch.Generator().manual_seed(0)
    assert torch.equal(next_tokens(scores, temperature=1.5, top_k=1, generator=sampler), greedy)
    assert torch.equal(next_tokens(scores, temperature=1.5, top_p=1e-6, generator=sampler), greedy)
    cfg = MODELS["llama-gqa"]
    params = model_params(cfg)
    prompts = random_prompts(cfg, gen)
    expected = generate(params, cfg, prompts, max_new_tokens=10, eos_token_id=None)
    for options in ({"top_k": 1}, {"top_p": 1e-6}):
        got = generate(
            params,
            cfg,
            prompts,
            max_new_tokens=10,
            eos_token_id=None,
            temperature=2.0,
            generator=sampler,
            **options,
        )
        assert got == expected


def test_top_k_samples_only_the_k_most_likely(gen):
    scores = torch.randn(50, generator=gen)
    allowed = set(scores.topk(5).indices.tolist())
    draws = next_tokens(scores.expand(4000, 50), temperature=3.0, top_k=5, generator=gen)
    assert set(draws.tolist()) == allowed  # every one of the k, and nothing else


def nucleus_reference(scores: torch.Tensor, p: float) -> tuple[set[int], float]:
    """The smallest set of most likely tokens whose probability reaches p, by sorting and summing in
    float64; also how close any partial sum came to p (a near tie is decided by rounding)."""
    probs = torch.softmax(scores.double(), -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    chosen, total = set(), 0.0
    closest = math.inf
    for i in order:
        chosen.add(i)
        total += probs[i]
        closest = min(closest, abs(total - p))
        if total >= p:
            break
    return chosen, closest


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_top_p_support_is_the_smallest_set_reaching_p(p, gen):
    checked = 0
    for _ in range(20):
        scores = torch.randn(30, generator=gen) * 2
        expected, closest = nucleus_reference(scores, p)
        if closest < 1e-5:
            continue
        kept = torch.isfinite(top_p_filter(scores[None], p)[0]).nonzero()[:, 0].tolist()
        assert set(kept) == expected
        draws = next_tokens(scores.expand(500, 30), temperature=1.0, top_p=p, generator=gen)
        assert set(draws.tolist()) <= expected
        checked += 1
    assert checked >= 15


def test_temperature_frequencies_match_softmax(gen):
    """40,000 draws from softmax(logits / 0.7): each token's count is binomial, so its frequency lies
    within 5 standard deviations sqrt(q (1 - q) / n) of its probability q except with probability
    below 6e-7 per token. The draws are seeded, so the test is deterministic anyway."""
    n, temperature = 40_000, 0.7
    scores = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    draws = next_tokens(scores.expand(n, 6), temperature=temperature, generator=gen)
    frequency = torch.bincount(draws, minlength=6).double() / n
    expected = torch.softmax(scores.double() / temperature, -1)
    tolerance = 5 * (expected * (1 - expected) / n).sqrt()
    assert torch.all((frequency - expected).abs() < tolerance)
    # Sampling at temperature 1 would be caught: its distribution is further off than the tolerance.
    assert torch.any((torch.softmax(scores.double(), -1) - expected).abs() > 3 * tolerance)


def test_same_seed_gives_same_samples(gen):
    cfg = MODELS["olmo2"]
    params = model_params(cfg)
    prompts = random_prompts(cfg, gen)

    def sample(seed: int) -> list[list[int]]:
        return generate(
            params,
            cfg,
            prompts,
            max_new_tokens=12,
            eos_token_id=None,
            temperature=1.0,
            top_k=20,
            top_p=0.95,
            generator=torch.Generator().manual_seed(seed),
        )

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


# --- stopping ----------------------------------------------------------------------------------


def test_eos_stops_its_row_and_is_left_out(gen):
    cfg = MODELS["olmo2"]
    params = model_params(cfg)
    prompts = random_prompts(cfg, gen)
    free = generate(params, cfg, prompts, max_new_tokens=12, eos_token_id=None)
    eos = free[0][4]
    expected = [row[: row.index(eos)] if eos in row else row for row in free]
    assert len(expected[0]) < 12 and any(len(row) == 12 for row in expected)
    assert generate(params, cfg, prompts, max_new_tokens=12, eos_token_id=eos) == expected
    for row, prompt in enumerate(prompts):
        assert expected[row] == greedy_without_cache(params, cfg, prompt, 12, eos=eos)


def test_max_new_tokens_and_max_length_are_respected(gen):
    cfg = MODELS["olmo3-window"]
    params = model_params(cfg)
    prompts = random_prompts(cfg, gen)
    free = generate(params, cfg, prompts, max_new_tokens=11, eos_token_id=None)
    assert [len(row) for row in free] == [11, 11, 11]
    capped = generate(params, cfg, prompts, max_new_tokens=11, eos_token_id=None, max_length=12)
    assert capped == [row[: 12 - len(p)] for row, p in zip(free, prompts, strict=True)]
    assert [len(row) for row in capped] == [7, 11, 3]
    assert generate(params, cfg, prompts, max_new_tokens=0, eos_token_id=None) == [[], [], []]


def test_stream_yields_each_step_for_every_row(gen):
    cfg = MODELS["olmo2"]
    params = model_params(cfg)
    prompts = random_prompts(cfg, gen)
    free = generate(params, cfg, prompts, max_new_tokens=6, eos_token_id=None)
    eos = free[1][2]
    steps = list(generate_stream(params, cfg, prompts, max_new_tokens=6, eos_token_id=eos))
    assert len(steps) == 6 and all(len(step) == 3 for step in steps)
    stopped = [step[1] for step in steps[free[1].index(eos) :]]
    assert stopped == [None] * len(stopped)
    collected = [[s[row] for s in steps if s[row] is not None] for row in range(3)]
    assert collected == generate(params, cfg, prompts, max_new_tokens=6, eos_token_id=eos)


def test_bad_prompts_and_settings_are_refused():
    cfg = MODELS["olmo2"]
    params = model_params(cfg)
    for prompts, options, needle in [
        ([[1, 2], []], {}, r"prompts\[1\] is empty"),
        ([[1, 40]], {}, r"prompts\[0\] holds token id 40"),
        ([[1, 2, 3]], {"max_length": 3}, "max_length=3 leaves no room"),
        ([[1]], {"temperature": -0.5}, "temperature=-0.5"),
        ([[1]], {"top_p": 0.0}, "top_p=0.0"),
        ([[1]], {"top_k": -2}, "top_k=-2"),
        ([[1]], {"max_new_tokens": -1}, "max_new_tokens=-1"),
    ]:
        settings = {"max_new_tokens": 4, "eos_token_id": None, **options}
        with pytest.raises(ConfigError, match=needle):
            generate_stream(params, cfg, prompts, **settings)  # raised at the call, before any step


# --- text --------------------------------------------------------------------------------------


def test_streamed_text_waits_for_whole_characters():
    """Byte tokens split "é", "€" and "😀" across tokens: no piece shows a partial character, and the
    pieces join to the whole text."""
    codec = byte_codec()
    prompt = codec.encode("> ")
    text = "héllo €5 😀!"
    tokens = codec.encode(text)
    pieces, shown = [], ""
    for i in range(1, len(tokens) + 1):
        piece = newly_completed(completion_text(codec, prompt, tokens[:i]), shown)
        pieces.append(piece)
        shown += piece
    assert "".join(pieces) == text
    assert not any(INCOMPLETE in piece for piece in pieces)
    assert pieces.count("") == len(tokens) - len(text)  # one held-back step per extra byte
    assert completion_text(codec, prompt, tokens[:2]) == "h" + INCOMPLETE


# --- run_generate ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    from olmo_fn.config import TrainConfig
    from olmo_fn.io.loader import DataConfig
    from olmo_fn.train import train

    run_dir = tmp_path_factory.mktemp("generate") / "run"
    train(
        TrainConfig(
            steps=3,
            schedule=ScheduleConfig(warmup_steps=1),
            global_batch_size=2,
            data=DataConfig(seq_len=32),
            run_dir=str(run_dir),
        ),
        progress=False,
    )
    return run_dir


def test_run_generate_streams_a_trained_byte_model(byte_run):
    out = io.StringIO()
    [completion] = run_generate(
        GenerateConfig(str(byte_run), ("def main(",), max_new_tokens=24, device="cpu"), out=out
    )
    assert out.getvalue() == completion + "\n"
    loaded = load_model(byte_run)
    prompt = list(b"def main(")
    expected = greedy_without_cache(loaded.params, loaded.cfg, prompt, 24, eos=BYTE_EOS)
    assert completion == decode_bytes(expected)
    assert len(expected) > 0


def test_run_generate_batches_several_prompts(byte_run):
    prompts = ("import ", "x = [", "é")
    out = io.StringIO()
    options = dict(max_new_tokens=10, temperature=0.9, top_k=50, seed=5, device="cpu")
    texts = run_generate(GenerateConfig(str(byte_run), prompts, **options), out=out)
    assert len(texts) == 3
    expected = "".join(
        f"=== prompt {i}: {p!r}\n{t}\n" for i, (p, t) in enumerate(zip(prompts, texts, strict=True))
    )
    assert out.getvalue() == expected
    assert run_generate(GenerateConfig(str(byte_run), prompts, **options), out=io.StringIO()) == texts


def train_bpe(path) -> int:
    """A byte-level BPE tokenizer.json trained on text with multi-byte characters; returns its EOS id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = ["héllo wörld, naïve café costs €5 😀", "def hello(): return 'wörld'", "the quick brown fox"]
    tokenizer.train_from_iterator(lines * 50, trainer)
    tokenizer.save(str(path))
    return tokenizer.token_to_id("<|endoftext|>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer

    from olmo_fn.io.hf_checkpoint import write_hf_model

    root = tmp_path_factory.mktemp("hf_generate")
    eos = train_bpe(root / "tokenizer.json")
    vocab = Tokenizer.from_file(str(root / "tokenizer.json")).get_vocab_size()
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48, vocab_size=vocab)
    params = model_params(cfg, seed=2).apply(lambda t: t.float())
    return write_hf_model(
        root / "hf", params, cfg, tokenizer=root / "tokenizer.json", extra_config={"eos_token_id": eos}
    )


def test_run_generate_on_hugging_face_directory_matches_transformers(hf_dir):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    out = io.StringIO()
    [completion] = run_generate(
        GenerateConfig(str(hf_dir), ("naïve café",), max_new_tokens=20, device="cpu"), out=out
    )
    assert out.getvalue() == completion + "\n"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = torch.tensor([tokenizer.encode("naïve café").ids])
    with torch.no_grad():
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20
        )
    new = generated[0, ids.shape[1] :].tolist()
    assert completion == tokenizer.decode(ids[0].tolist() + new)[len("naïve café") :]


def test_streamed_sampling_equals_completion_with_multibyte_tokens(hf_dir):
    """Sampling from a random model picks lone bytes of multi-byte characters; the stream still equals
    the completion decoded at once."""
    for seed in range(3):
        out = io.StringIO()
        options = dict(max_new_tokens=30, temperature=1.0, seed=seed, device="cpu")
        [completion] = run_generate(GenerateConfig(str(hf_dir), ("héllo",), **options), out=out)
        assert out.getvalue() == completion + "\n"
        assert len(completion) > 0


def test_run_generate_errors_name_what_is_wrong(byte_run, hf_dir, tmp_path):
    run = str(byte_run)
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        (
            dict(tokenizer=str(tmp_path / "missing.json")),
            ConfigError,
            "tokenizer=.*missing.json.*no such file",
        ),
        (dict(tokenizer=str(tmp_path / "bad.json")), ConfigError, "bad.json.*not a valid tokenizer.json"),
        (dict(prompt=("ok", "")), ConfigError, r"prompt\[1\]='' encodes to no tokens"),
        (
            dict(prompt=("a long prompt",), max_length=8),
            ConfigError,
            r"prompt\[0\] encodes to 13 tokens; max_length=8",
        ),
        (dict(prompt=()), ConfigError, "give at least one prompt"),
        (dict(checkpoint=str(tmp_path / "nowhere")), CheckpointError, "nowhere"),
    ]
    for change, error, needle in cases:
        settings = {"checkpoint": run, "prompt": ("hi",), "device": "cpu", **change}
        with pytest.raises(error, match=needle):
            run_generate(GenerateConfig(**settings), out=io.StringIO())
    for change, needle in [
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(top_k=-1), "top_k=-1"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            GenerateConfig(run, ("hi",), **change)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((hf_dir / name).read_bytes())
    with pytest.raises(ConfigError, match="does not name its tokenizer"):
        run_generate(GenerateConfig(str(no_tokenizer), ("hi",), device="cpu"), out=io.StringIO())
    # An override fixes it.
    text = run_generate(
        GenerateConfig(str(no_tokenizer), ("hi",), max_new_tokens=3, tokenizer="bytes"), out=io.StringIO()
    )
    assert len(text) == 1


def test_generate_config_parses_from_the_command_line():
    from olmo_fn.run import parse

    args = [
        "generate",
        "--checkpoint",
        "runs/x",
        "--prompt",
        "a b",
        "c",
        "--top-k",
        "5",
        "--temperature",
        "0.8",
    ]
    parsed = parse([*args, "--tokenizer", "bytes"])
    assert parsed == GenerateConfig("runs/x", ("a b", "c"), top_k=5, temperature=0.8, tokenizer="bytes")
