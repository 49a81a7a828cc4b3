"""``convert``: models to and from Hugging Face transformers directories."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from olmo_fn.errors import CheckpointError
from olmo_fn.io.byte_tokenizer import BYTE_PAD
from olmo_fn.io.hf_checkpoint import is_hf_dir, write_hf_model
from olmo_fn.io.model_source import load_model
from olmo_fn.io.safetensors_export import export_model

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class ConvertToHf:
    """Write a run's newest checkpoint, a checkpoint or an olmo_fn export as a Hugging Face model
    directory (Olmo2ForCausalLM, Olmo3ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM or
    OlmoeForCausalLM) that from_pretrained loads."""

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SOURCE")]
    """A run directory, checkpoint directory or olmo_fn export."""
    out: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    """A new (or empty) directory."""
    arch: Literal["auto", "olmo2", "olmo3", "llama", "qwen3", "olmoe"] = "auto"
    """Hugging Face architecture; auto picks the one that computes this model."""
    dtype: Dtype = "float32"
    """dtype of the written weights."""
    tokenizer: str | None = None
    """A tokenizer.json to include; default: the model's own, when it has one (not the byte tokenizer)."""


@dataclasses.dataclass(frozen=True)
class ConvertFromHf:
    """Import a Hugging Face model directory (Olmo2, Olmo3, Llama, Qwen3 or OLMoE; safetensors) as an
    olmo_fn export."""

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SOURCE")]
    """A transformers model directory (config.json + safetensors)."""
    out: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    """A new (or empty) directory for model.safetensors, config.json (and tokenizer.json)."""
    dtype: Dtype = "float32"
    """dtype of the written weights."""


def convert_to_hf(cmd: ConvertToHf) -> Path:
    model = load_model(cmd.source, dtype=getattr(torch, cmd.dtype))
    if model.source == "huggingface":
        raise CheckpointError(f"{cmd.source}: already a Hugging Face directory")
    tokenizer = cmd.tokenizer or (model.tokenizer if model.tokenizer not in (None, "bytes") else None)
    special = {"eos_token_id": model.eos_token_id, "bos_token_id": None}
    special["pad_token_id"] = BYTE_PAD if model.tokenizer == "bytes" else None
    return write_hf_model(
        cmd.out,
        model.params,
        model.cfg,
        arch=None if cmd.arch == "auto" else cmd.arch,
        dtype=getattr(torch, cmd.dtype),
        tokenizer=tokenizer,
        extra_config=special,
    )


def convert_from_hf(cmd: ConvertFromHf) -> Path:
    if not is_hf_dir(cmd.source):
        raise CheckpointError(
            f"{cmd.source}: not a Hugging Face model directory (no config.json with a model_type)"
        )
    model = load_model(cmd.source, dtype=getattr(torch, cmd.dtype))
    info = {"source": str(cmd.source), "eos_token_id": model.eos_token_id}
    return export_model(cmd.out, model.params, model.cfg, info, tokenizer=model.tokenizer)
