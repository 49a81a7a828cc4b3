"""float8 training of the block linears through torchao (tensorwise or rowwise dynamic scaling).

A pure wrapper around a block function, like the activation checkpointing policies: each of the
block's seven matrices is handed to the block as a `Float8Weight`, whose ``linear(x)`` casts the input
and the weight to float8 with the recipe's scales and multiplies them (and does the same for the two
matmuls of backward). The LM head and the embedding are not blocks, so they stay in the compute dtype.
torchao is imported only when a recipe is asked for; on CPU its matmuls are emulated (float8 values,
high-precision arithmetic).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch

from olmo_fn.errors import ConfigError
from olmo_fn.graph.model import BlockFn

Fp8Recipe = Literal["none", "tensorwise", "rowwise"]
BLOCK_MATRICES = {"attention": ("w_q", "w_k", "w_v", "w_out"), "feed_forward": ("w1", "w2", "w3")}
"""The matrices of a block that run in float8, by sublayer."""


@dataclasses.dataclass(frozen=True)
class Float8Matmul:
    """torchao's configuration of one recipe: what `Float8Weight.linear` passes to its matmul."""

    config: Any
    mm_config: Any
    apply: Any
    """torchao's float8 matmul: ``apply(x, weight_t, mm_config, config)``."""


NEEDS_TORCHAO = "needs torchao: pip install 'olmo_fn[fp8]'"


@functools.cache
def float8_matmul(recipe: str, emulate: bool) -> Float8Matmul:
    """The torchao configuration of `recipe` (one object per recipe, shared by every layer, so a
    compiled block sees the same constant for all of them)."""
    try:
        # torchao logs a warning for each optional kernel library its build lacks (unused here).
        quiet = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        try:
            from torchao.float8.config import Float8LinearConfig
            from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
            from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig
        finally:
            for logger, level in zip(quiet, levels, strict=True):
                logger.setLevel(level)
    except ImportError as err:
        raise ConfigError(f"fp8={recipe} {NEEDS_TORCHAO} (import failed: {err})") from None
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    gemms = (config.gemm_config_output, config.gemm_config_grad_input, config.gemm_config_grad_weight)
    mm = LinearMMConfig(
        *(ScaledMMConfig(emulate, g.use_fast_accum, False, config.pad_inner_dim) for g in gemms)
    )
    return Float8Matmul(config, mm, matmul_with_hp_or_float8_args.apply)


@dataclasses.dataclass(frozen=True)
class Float8Weight:
    """A block matrix ``(out, in)`` in the compute dtype that multiplies in float8."""

    weight: torch.Tensor
    matmul: Float8Matmul

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul.apply(x, self.weight.t(), self.matmul.mm_config, self.matmul.config)


def float8_block(block_fn: BlockFn, recipe: Fp8Recipe, *, emulate: bool) -> BlockFn:
    """`block_fn` with its matrices multiplied in float8 by `recipe` (``none``: `block_fn` itself).

    emulate: float8 values with high-precision matmuls (CPU, or GPUs without float8 tensor cores)."""
    if recipe == "none":
        return block_fn
    matmul = float8_matmul(recipe, emulate)

    def block(p: Mapping[str, Any], x, rope, mask, cfg):
        return block_fn(float8_view(p, matmul), x, rope, mask, cfg)

    return block


def float8_view(p: Mapping[str, Any], matmul: Float8Matmul) -> dict[str, Any]:
    """One block's parameters (compute layout) with its matrices as `Float8Weight`s."""
    view = dict(p)
    for sublayer, names in BLOCK_MATRICES.items():
        inner = dict(view[sublayer])
        for name in names:
            inner[name] = Float8Weight(inner[name], matmul)
        view[sublayer] = inner
    return view


def fp8_problems(recipe: str, model_dims: tuple[int, ...]) -> list[str]:
    """Why `recipe` cannot run on a model whose matrices have these dimensions (float8 matmuls need
    every dimension a multiple of 16), or here (torchao not installed)."""
    if recipe not in ("none", "tensorwise", "rowwise"):
        return [f"fp8={recipe!r} must be none, tensorwise or rowwise"]
    if recipe == "none":
        return []
    if importlib.util.find_spec("torchao") is None:  # looked up, not imported
        return [f"fp8={recipe} {NEEDS_TORCHAO}"]
    bad = sorted({d for d in model_dims if d % 16})
    if bad:
        return [
            f"fp8={recipe} needs every block matrix dimension to be a multiple of 16; this model has {bad}"
        ]
    return []
