"""``generate``: continue text prompts with a trained model, streaming a single prompt's completion.

The model comes from `olmo_fn.io.model_source.load_model` (a run directory, a checkpoint, an olmo_fn
export or a Hugging Face directory), which also names its tokenizer: the built-in byte tokenizer or a
``tokenizer.json``. Completions are the text the new tokens add after the prompt (the prompt is not
echoed, the EOS token is not included).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, TextIO

import torch

from olmo_fn.errors import ConfigError
from olmo_fn.graph.sampling import generate, generate_stream, sampling_problems
from olmo_fn.io.byte_tokenizer import BYTE_EOS, decode_bytes, encode_bytes
from olmo_fn.io.model_source import LoadedModel, load_model
from olmo_fn.io.text_tokenizer import end_of_text_id, open_tokenizer_json
from olmo_fn.runtime import resolve_device, resolve_dtype

INCOMPLETE = "\ufffd"
"""What decoding shows for a partial UTF-8 character (a byte token, or a BPE token holding part of one)."""


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Continue text prompts with a model: greedy by default, or sampled (temperature, top-k, top-p).

    A single prompt's completion is streamed as it is generated; several prompts run as one batch.
    """

    checkpoint: str
    """A run directory (its newest checkpoint), a checkpoint, an olmo_fn export or a Hugging Face model."""
    prompt: tuple[str, ...]
    """The text(s) to continue; each is encoded with the model's tokenizer."""
    max_new_tokens: int = 64
    """Most tokens to generate per prompt (fewer when EOS comes first)."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy (argmax), and then top-k, top-p and seed do nothing."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = no limit."""
    top_p: float = 1.0
    """Sample only from the smallest set of most likely tokens whose probability reaches top_p; 1 = all."""
    seed: int = 0
    """Seeds the sampling; the same seed gives the same completions."""
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype. auto: bfloat16 on CUDA, float32 on CPU."""
    tokenizer: str | None = None
    """Override the model's tokenizer: "bytes" (built-in) or a tokenizer.json path."""
    max_length: int | None = None
    """Most tokens per sequence, prompt included; a longer prompt is an error. None: no limit."""

    def __post_init__(self) -> None:
        problems = sampling_problems(self.temperature, self.top_k, self.top_p)
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"max_length={self.max_length} must be >= 2 (or None for no limit)")
        if problems:
            raise ConfigError("invalid generate config: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class TextCodec:
    """A tokenizer as two functions, with its end-of-text id when it has one."""

    name: str
    """"bytes" or the tokenizer.json path."""
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_token_id: int | None


def byte_codec() -> TextCodec:
    """The built-in byte tokenizer: UTF-8 bytes, EOS 256."""
    return TextCodec(
        name="bytes",
        encode=lambda text: encode_bytes(text, eos=False).tolist(),
        decode=decode_bytes,
        eos_token_id=BYTE_EOS,
    )


def tokenizer_json_codec(path: str, *, source: str) -> TextCodec:
    """A Hugging Face tokenizer.json: encodes with its special tokens (e.g. a BOS), decodes without.

    `source` says where the name came from, for the error message.
    """
    tokenizer = open_tokenizer_json(path, f"tokenizer={path!r} ({source})")
    return TextCodec(
        name=path,
        encode=lambda text: tokenizer.encode(text).ids,
        decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
        eos_token_id=end_of_text_id(tokenizer),
    )


def load_codec(override: str | None, model_tokenizer: str | None, checkpoint: str) -> TextCodec:
    """The tokenizer `override` names, else the one the model at `checkpoint` names."""
    name = override if override is not None else model_tokenizer
    if name is None:
        raise ConfigError(
            f"{checkpoint}: the model does not name its tokenizer; pass tokenizer (bytes or a tokenizer.json)"
        )
    if name == "bytes":
        return byte_codec()
    source = "given" if override is not None else f"named by {checkpoint}"
    return tokenizer_json_codec(name, source=source)


def encode_prompts(
    codec: TextCodec, prompts: Sequence[str], vocab_size: int, max_length: int | None
) -> list[list[int]]:
    """Token ids of each prompt; ConfigError for one that encodes to nothing, to ids outside the model's
    vocabulary, or to `max_length` tokens or more."""
    if not prompts:
        raise ConfigError("prompt: give at least one prompt to continue")
    encoded = []
    for i, text in enumerate(prompts):
        ids = codec.encode(text)
        if not ids:
            raise ConfigError(f"prompt[{i}]={text!r} encodes to no tokens with tokenizer {codec.name}")
        if max(ids) >= vocab_size:
            raise ConfigError(
                f"prompt[{i}]: tokenizer {codec.name} gives id {max(ids)}, but the model has "
                f"vocab_size={vocab_size} (wrong tokenizer?)"
            )
        if max_length is not None and len(ids) >= max_length:
            raise ConfigError(
                f"prompt[{i}] encodes to {len(ids)} tokens; max_length={max_length} leaves no room for more"
            )
        encoded.append(ids)
    return encoded


def completion_text(codec: TextCodec, prompt: Sequence[int], new: Sequence[int]) -> str:
    """The text `new` tokens add after `prompt` (decoded together, so merges across the boundary and
    leading-space rules come out as in the whole text)."""
    context = codec.decode(prompt)
    full = codec.decode([*prompt, *new])
    return full[len(context) :] if full.startswith(context) else codec.decode(new)


def newly_completed(text: str, shown: str) -> str:
    """What of `text` (the completion so far) can be shown after the already shown `shown`: the rest of
    it, or "" while it ends in a partial character (U+FFFD, completed by a later token) or does not
    extend `shown`."""
    if text.endswith(INCOMPLETE) or not text.startswith(shown):
        return ""
    return text[len(shown) :]


def stream_completion(
    codec: TextCodec, model: LoadedModel, prompt: list[int], settings: dict[str, Any], out: TextIO
) -> str:
    """Generate the continuation of one prompt, writing its text to `out` as it arrives (flushed per
    token that completes text), then a newline. Returns the completion decoded from all the new tokens
    at once; what was written equals it whenever decoding more tokens never changes earlier text."""
    new: list[int] = []
    shown = ""
    for step in generate_stream(model.params, model.cfg, [prompt], **settings):
        if step[0] is None:
            continue
        new.append(step[0])
        piece = newly_completed(completion_text(codec, prompt, new), shown)
        _write(out, piece)
        shown += piece
    completion = completion_text(codec, prompt, new)
    _write(out, completion[len(shown) :] + "\n")
    return completion


def _write(out: TextIO, text: str) -> None:
    if text:
        out.write(text)
        out.flush()


def run_generate(cfg: GenerateConfig, out: TextIO = sys.stdout) -> list[str]:
    """Load the model, continue every prompt, print the completions and return them.

    One prompt: its completion is written to `out` piece by piece (flushed as each arrives), then a
    newline. Several: one batch, then each completion under a header line ``=== prompt i: 'text'``.
    """
    device = resolve_device(cfg.device)
    model = load_model(cfg.checkpoint, device=device, dtype=resolve_dtype(cfg.dtype, device))
    codec = load_codec(cfg.tokenizer, model.tokenizer, cfg.checkpoint)
    prompts = encode_prompts(codec, cfg.prompt, model.cfg.vocab_size, cfg.max_length)
    settings = dict(
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=model.eos_token_id if model.eos_token_id is not None else codec.eos_token_id,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        generator=torch.Generator(device=device).manual_seed(cfg.seed),
        max_length=cfg.max_length,
    )
    if len(prompts) == 1:
        return [stream_completion(codec, model, prompts[0], settings, out)]
    completions = generate(model.params, model.cfg, prompts, **settings)
    texts = [completion_text(codec, p, c) for p, c in zip(prompts, completions, strict=True)]
    for i, (prompt, text) in enumerate(zip(cfg.prompt, texts, strict=True)):
        out.write(f"=== prompt {i}: {prompt!r}\n{text}\n")
    out.flush()
    return texts
