"""Which layers each pipeline stage holds, and which stages each pipeline rank runs: plain arithmetic,
shared by the trainer and the ``plan`` command.

The ``n_layers`` blocks are cut into ``pp × stages_per_rank`` consecutive stages, as evenly as they
go; when they do not divide, the first stages take one layer more (the last stage also runs the LM
head and the loss, the first only the embedding lookup). Stage 0 holds ``embeddings``; the last stage
holds ``lm_head``. Loop schedules give rank r the stages ``r, r + pp, r + 2 pp, ...``; the V-shaped
zbv gives rank r the stages ``r`` and ``2 pp - 1 - r`` (so rank 0 runs the first and the last).
"""

from __future__ import annotations

import itertools

from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.param_tree import param_shapes


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """The layer indices of each stage, in order."""
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for stage in range(n_stages):
        bounds.append(bounds[-1] + base + (stage < extra))
    return [range(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def rank_stages(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The stage indices pipeline rank `pp_rank` runs, in increasing order."""
    if schedule == "zbv":
        return sorted({pp_rank, 2 * pp - 1 - pp_rank})
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def stage_paths(model: ModelConfig, stage: int, n_stages: int) -> list[str]:
    """The parameter paths stage `stage` of `n_stages` holds."""
    layers = stage_layers(model.n_layers, n_stages)[stage]
    held = {f"blocks.{layer}." for layer in layers}
    paths = []
    for path in param_shapes(model):
        head = path.startswith("lm_head.") and stage == n_stages - 1
        embedding = path == "embeddings" and stage == 0
        if head or embedding or any(path.startswith(prefix) for prefix in held):
            paths.append(path)
    return paths
