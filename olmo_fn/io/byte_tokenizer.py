"""The built-in byte-level tokenizer: UTF-8 bytes 0-255, then EOS and PAD. Needs no files."""

from __future__ import annotations

import numpy as np

BYTE_EOS = 256
BYTE_PAD = 257
BYTE_VOCAB = 258


def encode_bytes(data: bytes | str, *, eos: bool = True) -> np.ndarray:
    """Token ids (uint16) of the UTF-8 bytes of `data`, followed by EOS when `eos`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
    return np.append(ids, np.uint16(BYTE_EOS)) if eos else ids


def decode_bytes(ids) -> str:
    """Text of the byte ids in `ids`; EOS, PAD and out-of-range ids are dropped."""
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")
