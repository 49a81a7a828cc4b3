"""`train_step(state, batch) -> (state, metrics)`: one optimizer update over a batch."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from tensordict import TensorDict

from olmo_fn.errors import ConfigError
from olmo_fn.graph.block import block_for
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.model import AttentionBackend, BlockFn, loss_sums
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.batch import Batch
from olmo_fn.parallelize.activation_checkpoint import (
    ActivationCheckpointing,
    checkpointed_block,
    checkpointing_problems,
)
from olmo_fn.parallelize.compile import compile_block
from olmo_fn.parallelize.context_parallel import context_parallel_block, context_parallel_slice
from olmo_fn.parallelize.expert_parallel import expert_parallel_block
from olmo_fn.parallelize.fp8 import Float8Matmul, Fp8Recipe, float8_block, float8_matmul
from olmo_fn.parallelize.mixed_precision import compute_params
from olmo_fn.parallelize.parallel_config import ZERO_BUBBLE_SCHEDULES
from olmo_fn.parallelize.placed_step import (
    Sharding,
    dp_sum,
    gathering_block,
    global_grad_norm,
    local_tree,
    loss_sum,
    model_view,
)
from olmo_fn.parallelize.tensor_parallel import tp_block_fn, tp_loss_sums
from olmo_fn.state.clip import clip_by_global_norm
from olmo_fn.state.gradients import GradientFn, Gradients
from olmo_fn.state.moe_terms import (
    add_stats,
    moe_compile_problem,
    moe_metrics,
    moe_objective_sum,
    update_expert_biases,
    without_expert_biases,
)
from olmo_fn.state.optim import optimizer_update
from olmo_fn.state.optim_config import OptimConfig
from olmo_fn.state.schedule import ScheduleConfig, lr_at
from olmo_fn.state.spikes import SpikeConfig, judge
from olmo_fn.state.train_state import TrainState

StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, torch.Tensor | float]]]


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What a train step needs besides the state and the batch; fixed for a run."""

    model: ModelConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    total_steps: int
    micro_batch_size: int
    compute_dtype: torch.dtype = torch.float32
    z_loss: float = 1e-5
    """Weight of the z-loss term ``mean(logsumexp(logits)²)`` in the objective (0 disables it)."""
    max_grad_norm: float | None = 1.0
    attention_backend: AttentionBackend = "auto"
    document_masking: bool = True
    """Attend only within documents and restart RoPE positions per document."""
    compile: bool = False
    """Run the transformer block as one torch.compile'd graph shared by all layers."""
    ac: ActivationCheckpointing = "none"
    """Activation checkpointing policy of every block (see olmo_fn.parallelize.activation_checkpoint)."""
    ac_budget: float = 0.5
    """With ac="budget": the share of an unchecked block's activations that may be kept."""
    loss_chunk_tokens: int | None = None
    """Make the logits and their gradient this many positions at a time; None: all at once."""
    fp8: Fp8Recipe = "none"
    """Multiply the block matrices in float8 with this torchao recipe (see olmo_fn.parallelize.fp8)."""
    compile_step: bool = False
    """Compile the whole update (forward, backward, clipping, AdamW) as one graph instead of the block
    (see olmo_fn.state.compiled_step); one process only."""
    fp8_emulate: bool = False
    """Emulate the float8 matmuls (float8 values, high-precision arithmetic): on CPU."""
    spike: SpikeConfig = SpikeConfig()
    """When a step's update is skipped as a spike (off by default)."""


def execution_text(settings: StepSettings) -> str:
    """How the step runs besides device and dtype, for the line a run starts with ("" for defaults)."""
    parts = []
    if settings.ac != "none":
        budget = f" {settings.ac_budget:g}" if settings.ac == "budget" else ""
        parts.append(f"ac {settings.ac}{budget}")
    if settings.fp8 != "none":
        parts.append(f"fp8 {settings.fp8}{' (emulated)' if settings.fp8_emulate else ''}")
    if settings.loss_chunk_tokens:
        parts.append(f"loss in chunks of {settings.loss_chunk_tokens} positions")
    return "".join(f", {p}" for p in parts)


LossSumsFn = Callable[[TensorDict, Batch], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def block_function(settings: StepSettings, sharding: Sharding | None) -> BlockFn:
    """The function that runs one block: the plain (or compiled) block in one process; under a
    sharding, the block of its plan (TP, CP, EP) run on a stored block, gathered first. Either way under
    the activation checkpointing policy ``settings.ac``."""
    cfg = settings.model
    problem = checkpointing_problem(settings, sharding)
    if settings.compile:
        problem = problem or moe_compile_problem(cfg, settings.compute_dtype)
    if problem:
        raise ConfigError(problem)
    budget = settings.ac_budget if settings.ac == "budget" else None
    if sharding is None:
        block_fn = float8_block(block_for(cfg), settings.fp8, emulate=settings.fp8_emulate)
        block_fn = checkpointed_block(block_fn, settings.ac)
        return compile_block(block_fn, memory_budget=budget) if settings.compile else block_fn
    tp, cp = sharding.tp, sharding.cp
    if tp is not None and settings.compile:
        raise ConfigError("compile with tensor parallelism (parallel.tp > 1) is not supported yet")
    # Resharding after forward saves memory only where parameters are sharded over data-parallel
    # (or context-parallel) ranks: the selective policy recomputes the gather in backward. Compiled,
    # the block gathers its own parameters inside its graph (the compiler sees the all-gather, and the
    # reduce-scatter of the backward) and keeps them for backward unless a policy says otherwise.
    shape = sharding.layout.shape
    reshard = shape.dp_shard * shape.cp > 1 and not settings.compile and not _split_backward(sharding)
    policy = settings.ac if settings.ac != "none" or not reshard else "selective"
    if sharding.ep is not None and settings.compile:
        raise ConfigError("compile with expert parallelism (parallel.ep > 1) is not supported yet")
    if tp is not None:
        block_fn = tp_block_fn(cfg, tp, cp)
    elif sharding.ep is not None:
        block_fn = expert_parallel_block(cfg, sharding.ep)
    else:
        block_fn = context_parallel_block(cfg, cp) if cp is not None else block_for(cfg)
    block_fn = float8_block(block_fn, settings.fp8, emulate=settings.fp8_emulate)
    block_fn = gathering_block(block_fn, sharding, checkpointing=policy, float8=float8_gathering(settings))
    return compile_block(block_fn, memory_budget=budget) if settings.compile else block_fn


def float8_gathering(settings: StepSettings) -> Float8Matmul | None:
    """The float8 configuration whose sharded block matrices are gathered in float8: the tensorwise
    recipe's (one scale per matrix), in eager blocks; None for rowwise, and for compiled blocks
    (gathered in the compute dtype, then cast: see `olmo_fn.parallelize.float8_gather`)."""
    if settings.fp8 != "tensorwise" or settings.compile:
        return None
    return float8_matmul(settings.fp8, settings.fp8_emulate)


def _split_backward(sharding: Sharding | None) -> bool:
    """Zero-bubble pipeline schedules run a block's backward in two passes (inputs, then weights),
    which a recomputed (checkpointed) region does not allow."""
    return (
        sharding is not None
        and sharding.pipeline is not None
        and (sharding.pipeline.schedule in ZERO_BUBBLE_SCHEDULES)
    )


def checkpointing_problem(settings: StepSettings, sharding: Sharding | None) -> str | None:
    """Why ``settings.ac`` cannot run as asked, or None."""
    if settings.ac == "budget" and not settings.compile:
        return "ac=budget is chosen by torch.compile's partitioner: it needs compile (or use full/selective)"
    pipeline = sharding.pipeline if sharding is not None else None
    problems = checkpointing_problems(
        settings.ac, settings.ac_budget, pipeline.schedule if pipeline else None
    )
    return "; ".join(problems) or None


def make_loss_sums_fn(
    settings: StepSettings, sharding: Sharding | None = None, *, with_aux: bool = False
) -> LossSumsFn:
    """``loss_sums(params, batch) -> (ce_sum, z_sum, n_targets)`` of the model on one (micro-)batch, as
    `olmo_fn.graph.model.loss_sums` computes them, under `sharding` when given (then collective, with
    this rank's share of the rows, or of their positions under context parallelism: the sums are this
    share's, not yet summed over ranks). With `with_aux`, a fourth item: the MoE layers' auxiliary
    sums ``{layer: MoeAux}``."""
    cfg = settings.model
    tp = sharding.tp if sharding is not None else None
    cp = sharding.cp if sharding is not None else None
    block_fn = block_function(settings, sharding)
    if tp is None:
        model_loss_sums = functools.partial(loss_sums, loss_chunk_tokens=settings.loss_chunk_tokens)
    else:  # the vocabulary-parallel loss: 1/tp of each chunk's logits per rank
        model_loss_sums = functools.partial(tp_loss_sums, tp=tp, loss_chunk_tokens=settings.loss_chunk_tokens)

    def sums(params: TensorDict, mb: Batch):
        kwargs = {}
        if cp is not None:  # this rank's slice of the rows, with its RoPE tables and masks
            mb, inputs = context_parallel_slice(
                mb,
                cfg,
                cp,
                document_masking=settings.document_masking,
                backend=settings.attention_backend,
            )
            kwargs = {"inputs": inputs}
        elif settings.document_masking:
            kwargs = {"positions": mb.positions, "doc_ids": mb.doc_ids}
        view = (
            compute_params(params, settings.compute_dtype)
            if sharding is None
            else model_view(params, sharding)
        )
        if tp is None:
            kwargs["with_aux"] = with_aux
        out = model_loss_sums(
            view,
            mb.input_ids,
            mb.labels,
            cfg,
            backend=settings.attention_backend,
            block_fn=block_fn,
            **kwargs,
        )
        return (*out, {}) if with_aux and tp is not None else out  # MoE runs without TP

    return sums


def make_gradient_fn(settings: StepSettings, sharding: Sharding | None = None) -> GradientFn:
    """``gradients(params, batch)``: the gradient of the batch's objective, ``(ce_sum + z_loss *
    z_sum) / n_targets`` over the whole (global) batch, plus an MoE model's weighted auxiliary sums
    over the same count (`olmo_fn.state.moe_terms`).

    The batch is split into micro-batches of ``settings.micro_batch_size`` rows; their gradients
    accumulate, and every micro-batch's loss is divided by the target count of the whole batch, so
    the result equals the gradient of the whole batch at once. With a `sharding`, `params` are placed
    DTensors, `batch` is this rank's share of the global batch, and the call is collective.
    """
    sums = make_loss_sums_fn(settings, sharding, with_aux=True)

    def objective(params, mb: Batch, n_targets: torch.Tensor):
        ce_sum, z_sum, _, aux = sums(params, mb)
        total = ce_sum + settings.z_loss * z_sum + moe_objective_sum(aux, settings.model)
        return total / n_targets, ce_sum.detach(), z_sum.detach(), aux

    def gradients(params: TensorDict, batch: Batch) -> Gradients:
        paths, leaves = zip(*flatten(params).items(), strict=True)
        n_targets = dp_sum((batch.labels != -100).sum(), sharding).clamp(min=1)
        grads: list[torch.Tensor] | None = None
        ce_sums, z_sums, stats = [], [], {}
        for mb in batch.split(settings.micro_batch_size):
            loss, ce_sum, z_sum, aux = objective(params, mb, n_targets)
            stats = add_stats(stats, aux)
            # allow_unused: no gradient reaches an MoE layer's expert bias (it only steers the choice)
            mb_grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            mb_grads = [
                torch.zeros_like(t) if g is None else g for t, g in zip(leaves, mb_grads, strict=True)
            ]
            if grads is None:
                grads = list(mb_grads)
            else:  # in place, one multi-tensor kernel (DTensor gradients of equal placements too)
                torch._foreach_add_(grads, mb_grads)
            ce_sums.append(ce_sum)
            z_sums.append(z_sum)
        return Gradients(
            dict(zip(paths, grads, strict=True)),
            loss_sum(torch.stack(ce_sums).sum(), sharding),
            loss_sum(torch.stack(z_sums).sum(), sharding),
            n_targets,
            summed_stats(stats, sharding),
        )

    return gradients


def summed_stats(stats: dict[str, torch.Tensor], sharding: Sharding | None) -> dict[str, torch.Tensor]:
    """`stats` summed over the ranks that hold different rows, in one collective."""
    if not stats or sharding is None:
        return stats
    flat = loss_sum(torch.cat([value.reshape(-1) for value in stats.values()]), sharding)
    sizes = [value.numel() for value in stats.values()]
    return {
        key: part.reshape(value.shape)
        for (key, value), part in zip(stats.items(), flat.split(sizes), strict=True)
    }


def make_train_step(settings: StepSettings, sharding: Sharding | None = None) -> StepFn:
    """A `train_step(state, batch)` closed over fixed settings: `make_gradient_fn`'s gradients,
    clipped by their global norm, applied by the optimizer at the scheduled learning rate.

    With a `sharding`, the state's parameters and moments are DTensors placed by its plan, `batch` is
    this rank's share of the global batch, and the step is collective (every rank calls it); the
    update runs on each rank's local shards.

    The returned step consumes its input state: parameter and optimizer buffers are updated in place
    and belong to the returned state. Metrics are 0-dim tensors (no host sync) plus ``lr``: ``loss``
    (mean cross-entropy per target), ``z_loss`` (the weighted z-loss term added to it in the
    objective), ``logsumexp_sq`` (the unweighted mean of logsumexp(logits)², what z_loss weighs),
    ``grad_norm`` (before clipping) and ``n_targets``.
    """
    if settings.compile_step:
        from olmo_fn.state.compiled_step import make_compiled_train_step, step_compile_problems

        problems = step_compile_problems(settings, sharded=sharding is not None)
        if problems:
            raise ConfigError("; ".join(problems))
        return make_compiled_train_step(settings)
    if sharding is not None and sharding.pipeline is not None:
        from olmo_fn.state.pipeline_step import make_pipeline_gradient_fn

        gradient_fn = make_pipeline_gradient_fn(settings, sharding)
    else:
        gradient_fn = make_gradient_fn(settings, sharding)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        result = gradient_fn(state.params, batch)
        paths, grads = list(result.grads), list(result.grads.values())
        placed = grads  # DTensors under a sharding
        if sharding is None:
            grad_norm = clip_by_global_norm(grads, settings.max_grad_norm)
        else:  # the norm spans every rank's shards; the scaling is elementwise on the local ones
            norm = global_grad_norm(grads, sharding)
            grads = [g.to_local() for g in grads]  # the DTensors' own local tensors: clipped in place
            grad_norm = clip_by_global_norm(grads, settings.max_grad_norm, norm=norm)
        lr = lr_at(
            state.step, peak=settings.optim.lr, cfg=settings.schedule, total_steps=settings.total_steps
        )
        params, opt_state = state.params, state.opt_state
        if sharding is not None and settings.optim.name == "muon":
            # Muon orthogonalises whole matrices: it updates the placed (DTensor) trees, whose matmuls
            # and norms span the shards with DTensor's collectives
            grads = placed
        elif sharding is not None:  # elementwise updates run on each rank's local shards, in place
            with torch.no_grad():
                params, opt_state = local_tree(params), local_tree(opt_state)
        skip, spikes = False, state.spikes
        if settings.spike.sigmas:  # a host sync: the decision is made before the update
            loss = (result.ce_sum / result.n_targets).item()
            skip, spikes = judge(spikes, loss, float(grad_norm), settings.spike)
        if not skip:
            optimizer_update(
                without_expert_biases(params, settings.model),
                dict(zip(paths, grads, strict=True)),
                without_expert_biases(opt_state, settings.model),
                step=state.step + 1,
                lr=lr,
                cfg=settings.optim,
            )
            update_expert_biases(state.params, result.moe_stats, settings.model)
        dp = sharding.layout.shape.dp if sharding else 1  # `batch` is this rank's 1/dp of the global batch
        new_state = dataclasses.replace(
            state,
            step=state.step + 1,
            data_cursor=state.data_cursor + batch.input_ids.shape[0] * dp,
            tokens_seen=state.tokens_seen + batch.n_tokens * dp,
            spikes=spikes,
        )
        n_targets = result.n_targets
        metrics = {
            "loss": result.ce_sum / n_targets,
            # The z-loss as it enters the objective (weight included), and its unweighted mean.
            "z_loss": settings.z_loss * result.z_sum / n_targets,
            "logsumexp_sq": result.z_sum / n_targets,
            "grad_norm": grad_norm,
            "lr": lr,
            "n_targets": n_targets,
        }
        metrics.update(moe_metrics(result.moe_stats, settings.model))
        if settings.spike.sigmas:
            metrics["skipped"] = int(skip)
            metrics["skipped_steps"] = spikes.skipped
        return new_state, metrics

    return train_step
