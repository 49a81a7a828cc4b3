"""Pure model functions over parameter trees. Nothing here holds state or knows about parallelism.

Typical use::

    from olmo_fn.graph import get_preset, init_params, logits
    cfg = get_preset("olmo2-tiny")
    params = init_params(cfg, seed=0)
    out = logits(params, input_ids, cfg)          # (batch, seq, vocab_size)
"""

from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.init import init_params
from olmo_fn.graph.loss import IGNORE_INDEX, cross_entropy_sums
from olmo_fn.graph.model import hidden_states, lm_head, logits, loss_sums
from olmo_fn.graph.presets import PRESETS, get_preset

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "ModelConfig",
    "cross_entropy_sums",
    "get_preset",
    "hidden_states",
    "init_params",
    "lm_head",
    "logits",
    "loss_sums",
]
