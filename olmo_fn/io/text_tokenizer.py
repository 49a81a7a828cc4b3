"""Tokenizers for `prepare-data`: the built-in byte tokenizer, or a Hugging Face ``tokenizer.json``.

Both are described by a picklable `TokenizerSpec` (the tokenizer.json text itself, not its path, so
worker processes encode with exactly the file that was checked and hashed) and encode batches of
documents into token-id arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from olmo_fn.errors import ConfigError
from olmo_fn.io.byte_tokenizer import BYTE_EOS, BYTE_VOCAB

BYTES = "bytes"
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|end|>")
"""Special tokens recognised as end-of-document, in order of preference."""


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """What encodes the text: ``name`` "bytes", or a tokenizer.json given by path and contents."""

    name: str
    """"bytes", or the tokenizer.json path as given."""
    json_text: str | None
    """The tokenizer.json contents (None for bytes)."""
    identity: str
    """Stable across runs and machines: "bytes-v1", or "tokenizer.json:" + a digest of the contents."""
    vocab_size: int
    """One more than the largest id the tokenizer can produce."""
    default_eos: int | None
    """The byte tokenizer's EOS, or the id of a recognised end-of-text special token."""


def load_tokenizer_spec(name: str) -> TokenizerSpec:
    """The spec of tokenizer `name`; a ConfigError names a tokenizer.json that is missing or invalid."""
    if name == BYTES:
        return TokenizerSpec(BYTES, None, "bytes-v1", BYTE_VOCAB, BYTE_EOS)
    path = Path(name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"prepare.tokenizer={name}: file not found (give 'bytes' or a tokenizer.json)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"prepare.tokenizer={name}: cannot read ({exc})") from None
    tokenizer = parse_tokenizer_json(data, f"prepare.tokenizer={name}")
    ids = list(tokenizer.get_vocab(with_added_tokens=True).values())
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    return TokenizerSpec(
        name=name,
        json_text=data.decode("utf-8"),
        identity=f"tokenizer.json:{digest}",
        vocab_size=max([*ids, tokenizer.get_vocab_size(with_added_tokens=True) - 1]) + 1,
        default_eos=end_of_text_id(tokenizer),
    )


def parse_tokenizer_json(data: bytes, where: str):
    """A `tokenizers.Tokenizer` from tokenizer.json contents; a ConfigError starting with `where`
    (e.g. "prepare.tokenizer=x.json") if it does not parse."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(f"{where} needs the tokenizers package (pip install tokenizers)") from None
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exceptions for every parse failure
        raise ConfigError(f"{where}: not a valid tokenizer.json ({exc})") from None


def open_tokenizer_json(path: str | Path, where: str):
    """`parse_tokenizer_json` of the file at `path`; a missing file is a ConfigError too."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot read ({exc})"
        raise ConfigError(f"{where}: {reason}; give 'bytes' or a tokenizer.json path") from None
    return parse_tokenizer_json(data, where)


def end_of_text_id(tokenizer) -> int | None:
    """The id of the first special token in END_OF_TEXT_TOKENS that `tokenizer` has, else None."""
    specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    for token in END_OF_TEXT_TOKENS:
        if token in specials:
            return specials[token]
    return None


class TextTokenizer:
    """Encodes batches of documents with the tokenizer a `TokenizerSpec` describes."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._hf = None if spec.json_text is None else _hf_tokenizer(spec.json_text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The token ids (int64) of each text, without special tokens added."""
        if self._hf is None:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)  # fast: no offsets
        encodings = encode(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encodings]


def _hf_tokenizer(json_text: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json_text)
