"""Pipeline parallelism: the layers cut into stages, each a pure function of its parameter subtree,
run by a `torch.distributed.pipelining` schedule.

A stage (`pipeline_stages`) holds consecutive blocks; the first also embeds the token ids, the last
also applies the final norm, the LM head and the loss, and returns the micro-batch's share of the
objective (a scalar), which the schedule's loss function hands back as it is. So the last stage makes
its logits as one process does: all at once, or chunk by chunk (`loss_chunk_tokens`, each chunk
recomputed in backward: `recomputed_chunks`) without ever holding a micro-batch's whole logits.
Only the hidden states travel between stages; the RoPE positions, document ids and labels of each
micro-batch are given to every stage by its own rank (every pipeline rank reads the same rows), so
each stage builds its layers' masks itself.

torch's schedules call a module: `_StageModule` is that calling convention and nothing more. It owns
no tensors; its `parameters()` are the stage's leaves of the train state's tree (read at each step),
which the zero-bubble schedules need to split weight gradients from input gradients. Gradients land
in those leaves' ``.grad`` (summed over micro-batches: ``scale_grads=False``, and every micro-batch's
loss is already divided by the whole batch's target count) and are taken from there.

Stages are built with their input and output shapes given (static metadata): torch then runs no
extra forward and backward to discover them, and never calls the loss function outside the schedule.
Every micro-batch of every step has the shape of the first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn
from torch.distributed import pipelining

from olmo_fn.graph.loss import cross_entropy_sums
from olmo_fn.graph.model import BlockFn, layer_inputs
from olmo_fn.graph.norms import rms_norm
from olmo_fn.graph.param_tree import flatten
from olmo_fn.parallelize.compute_layout import to_compute, tree_to_compute
from olmo_fn.parallelize.pipeline_stages import rank_stages, stage_layers
from olmo_fn.parallelize.placed_step import Sharding, StoredBlock
from olmo_fn.parallelize.recomputed_chunks import recomputed_chunk_sums
from olmo_fn.parallelize.tensor_parallel import (
    gather_seq,
    vocab_parallel_embedding,
    vocab_parallel_linear_cross_entropy_sums,
)

SCHEDULES: dict[str, type] = {
    "gpipe": pipelining.ScheduleGPipe,
    "1f1b": pipelining.Schedule1F1B,
    "interleaved-1f1b": pipelining.ScheduleInterleaved1F1B,
    "looped-bfs": pipelining.ScheduleLoopedBFS,
    "interleaved-zb": pipelining.ScheduleInterleavedZeroBubble,
    "zbv": pipelining.ScheduleZBVZeroBubble,
}


class _StageModule(nn.Module):
    """A stage function in the form torch's schedules call (see the module docstring)."""

    def __init__(self, forward: Callable[..., torch.Tensor], leaves: Callable[[], list[torch.Tensor]]):
        super().__init__()
        self._forward = forward
        self._leaves = leaves

    def parameters(self, recurse: bool = True):
        yield from self._leaves()

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return self._forward(x, positions, doc_ids, labels)


@dataclasses.dataclass
class StepSums:
    """Per-step values the last stage reads and writes: the normaliser it divides by, and each
    micro-batch's loss sums (on the ranks that run the last stage)."""

    n_targets: torch.Tensor | None = None
    ce: list[torch.Tensor] = dataclasses.field(default_factory=list)
    z: list[torch.Tensor] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Pipeline:
    """This rank's stages, their schedule, and the tree their modules read at each step."""

    stage_indices: list[int]
    n_stages: int
    schedule: Any
    sums: StepSums
    current: dict[str, TensorDict]

    @property
    def first(self) -> bool:
        return 0 in self.stage_indices

    @property
    def last(self) -> bool:
        return self.n_stages - 1 in self.stage_indices


def build_pipeline(
    sharding: Sharding,
    *,
    block_fn: BlockFn,
    model_cfg,
    micro_batch_rows: int,
    n_micro_batches: int,
    seq_len: int,
    compute_dtype: torch.dtype,
    z_loss: float,
    loss_chunk_tokens: int | None,
    document_masking: bool,
    backend: str,
    device: torch.device,
    forward_only: bool = False,
) -> Pipeline:
    """This rank's stages and the schedule `sharding.pipeline` names, for micro-batches of
    ``(micro_batch_rows, seq_len)``. block_fn: runs one ``StoredBlock`` (gathering it first);
    loss_chunk_tokens: the last stage's LM head and loss that many positions at a time (None: all).

    `forward_only` (evaluation): a schedule that takes any micro-batch count and places the stages
    alike (GPipe, or looped BFS for loop-style interleaving), run with ``schedule.eval``. The V-shaped
    zbv has none (`evaluation_problem`)."""
    cfg = model_cfg
    spec, layout = sharding.pipeline, sharding.layout
    shape = layout.shape
    n_stages = shape.pp * spec.stages_per_rank
    layers = stage_layers(cfg.n_layers, n_stages)
    mine = rank_stages(layout.pp_rank, shape.pp, spec.stages_per_rank, spec.schedule)
    tp, plan, rules = sharding.tp, sharding.plan, sharding.rules
    current: dict[str, TensorDict] = {}
    sums_of_step = StepSums()

    def stage_forward(stage: int) -> Callable[..., torch.Tensor]:
        def forward(
            x: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor, labels: torch.Tensor
        ) -> torch.Tensor:
            params = current["params"]
            if stage == 0:
                rows = to_compute(params["embeddings"], rules["embeddings"], plan)
                x = vocab_parallel_embedding(x, rows, tp) if tp is not None else F.embedding(x, rows)
            masked = {"positions": positions, "doc_ids": doc_ids} if document_masking else {}
            rope, masks = layer_inputs(positions, cfg, list(layers[stage]), backend=backend, **masked)
            for layer in layers[stage]:
                stored = StoredBlock(params["blocks"][str(layer)], sharding.block_rules)
                x = block_fn(stored, x, rope, masks[layer], cfg)
            if stage < n_stages - 1:
                return x
            head = tree_to_compute(params["lm_head"], "lm_head.", plan, rules)
            h = rms_norm(x, head["norm"], cfg.norm_eps)
            if tp is not None:
                ce, z, _ = vocab_parallel_linear_cross_entropy_sums(
                    gather_seq(h, tp), head["w_out"], labels, tp, loss_chunk_tokens
                )
            else:  # chunks recomputed by checkpoint, not graph.loss's function: see recomputed_chunks
                ce, z, _ = recomputed_chunk_sums(
                    h, head["w_out"], labels, loss_chunk_tokens, cross_entropy_sums
                )
            sums_of_step.ce.append(ce.detach())
            sums_of_step.z.append(z.detach())
            return (ce + z_loss * z) / sums_of_step.n_targets

        return forward

    def stage_leaves(stage: int) -> Callable[[], list[torch.Tensor]]:
        prefixes = [f"blocks.{layer}." for layer in layers[stage]]
        prefixes += ["embeddings"] if stage == 0 else []
        prefixes += ["lm_head."] if stage == n_stages - 1 else []

        def leaves() -> list[torch.Tensor]:
            flat = flatten(current["params"])
            return [t for path, t in flat.items() if any(path.startswith(p) for p in prefixes)]

        return leaves

    def loss_fn(objective: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return objective  # the last stage's output is already the micro-batch's objective

    tp_size = shape.tp
    hidden = (micro_batch_rows, seq_len // tp_size, cfg.d_model)

    def example(size, dtype=compute_dtype, grad=True):
        return torch.empty(size, dtype=dtype, device=device, requires_grad=grad)

    objective = example((), torch.promote_types(compute_dtype, torch.float32))  # the last stage's output

    stages = []
    for stage in mine:
        inputs = (
            (example((micro_batch_rows, seq_len), torch.long, False),) if stage == 0 else (example(hidden),)
        )
        outputs = (objective,) if stage == n_stages - 1 else (example(hidden),)
        module = _StageModule(stage_forward(stage), stage_leaves(stage))
        stages.append(
            pipelining.PipelineStage(
                module,
                stage,
                n_stages,
                device,
                input_args=inputs,
                output_args=outputs,
                group=layout.pp_group,
            )
        )
    name = spec.schedule
    if forward_only:
        name = "gpipe" if spec.stages_per_rank == 1 else "looped-bfs"
    schedule_cls = SCHEDULES[name]
    single = name in ("gpipe", "1f1b")
    schedule = schedule_cls(
        stages[0] if single else stages, n_microbatches=n_micro_batches, loss_fn=loss_fn, scale_grads=False
    )
    return Pipeline(mine, n_stages, schedule, sums_of_step, current)


def run_pipeline(pipeline: Pipeline, params: TensorDict, batch, n_targets: torch.Tensor) -> None:
    """One forward and backward of `batch` (this data-parallel rank's rows) through the pipeline;
    gradients accumulate in the leaves' ``.grad``, loss sums in ``pipeline.sums``."""
    pipeline.current["params"] = params
    pipeline.sums.n_targets = n_targets
    pipeline.sums.ce.clear()
    pipeline.sums.z.clear()
    args = (batch.input_ids,) if pipeline.first else ()
    target = batch.labels if pipeline.last else None  # only so that torch calls `loss_fn`
    pipeline.schedule.step(
        *args,
        target=target,
        return_outputs=False,
        positions=batch.positions,
        doc_ids=batch.doc_ids,
        labels=batch.labels,
    )


@torch.no_grad()
def evaluate_pipeline(pipeline: Pipeline, params: TensorDict, batch) -> None:
    """Forward `batch` through the pipeline (no gradients); loss sums land in ``pipeline.sums``."""
    pipeline.current["params"] = params
    pipeline.sums.n_targets = torch.ones((), device=batch.input_ids.device)
    pipeline.sums.ce.clear()
    pipeline.sums.z.clear()
    args = (batch.input_ids,) if pipeline.first else ()
    target = batch.labels if pipeline.last else None
    pipeline.schedule.eval(
        *args,
        target=target,
        return_outputs=False,  # the last stage's outputs are its objective; the sums are kept aside
        positions=batch.positions,
        doc_ids=batch.doc_ids,
        labels=batch.labels,
    )


def pipeline_sum(value: torch.Tensor, sharding: Sharding) -> torch.Tensor:
    """`value` summed over the pipeline ranks (a statistic only some stages have; the others add 0)."""
    value = value.detach().clone()
    dist.all_reduce(value, group=sharding.layout.pp_group)
    return value
