"""Mixed precision as an explicit, differentiable cast of the parameter tree."""

from __future__ import annotations

import torch
from tensordict import TensorDict


def compute_params(params: TensorDict, dtype: torch.dtype) -> TensorDict:
    """The parameters in the compute dtype (e.g. bf16 from fp32 masters).

    The cast is an ordinary autograd op, so gradients arrive at the fp32 masters in fp32; the
    compiler sees it and can fuse it. Returns `params` itself when nothing needs casting.
    """
    if all(t.dtype == dtype for t in params.values(include_nested=True, leaves_only=True)):
        return params
    return params.apply(lambda t: t.to(dtype))
