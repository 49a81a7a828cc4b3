"""The gradients of a batch under pipeline parallelism: the same objective as `make_gradient_fn`,
with the micro-batches flowing through this rank's stages by the plan's schedule."""

from __future__ import annotations

import dataclasses

import torch
from tensordict import TensorDict

from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.batch import Batch
from olmo_fn.parallelize.pipeline import (
    Pipeline,
    build_pipeline,
    evaluate_pipeline,
    pipeline_sum,
    run_pipeline,
)
from olmo_fn.parallelize.placed_step import Sharding, dp_sum, loss_sum
from olmo_fn.state.gradients import GradientFn, Gradients
from olmo_fn.state.train_step import StepSettings, block_function


def make_pipeline_gradient_fn(settings: StepSettings, sharding: Sharding) -> GradientFn:
    """``gradients(params, batch)`` as `make_gradient_fn` defines them, for this rank's stages.

    `params` holds this rank's stages' parameters; `batch` is its data-parallel share of the global
    batch (every pipeline rank of a data-parallel group reads the same rows). The loss sums exist on
    the last stage and are summed over the pipeline ranks, so every rank reports them; each rank's
    gradients are those of its own parameters.
    """
    pipeline_for = _pipelines(settings, sharding, forward_only=False)

    def gradients(params: TensorDict, batch: Batch) -> Gradients:
        pipeline = pipeline_for(batch)
        n_targets = dp_sum((batch.labels != -100).sum(), sharding).clamp(min=1)
        run_pipeline(pipeline, params, batch, n_targets)
        grads = {}
        for path, leaf in flatten(params).items():
            grads[path] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            leaf.grad = None
        ce, z = (
            loss_sum(pipeline_sum(value, sharding), sharding) for value in _sums(pipeline, batch, settings)
        )
        return Gradients(grads, ce, z, n_targets)

    return gradients


def make_pipeline_loss_sums_fn(settings: StepSettings, sharding: Sharding):
    """``loss_sums(params, batch) -> (ce_sum, z_sum, n_targets)`` of `batch` through the pipeline,
    forward only, summed over the pipeline ranks (so every rank has them; for evaluation)."""
    pipeline_for = _pipelines(dataclasses.replace(settings, compile=False), sharding, forward_only=True)

    def loss_sums(params: TensorDict, batch: Batch):
        pipeline = pipeline_for(batch)
        evaluate_pipeline(pipeline, params, batch)
        ce, z = (pipeline_sum(value, sharding) for value in _sums(pipeline, batch, settings))
        return ce, z, (batch.labels != -100).sum()

    return loss_sums


def _sums(pipeline: Pipeline, batch: Batch, settings: StepSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's step sums of the cross-entropy and z-loss terms (zero before the last stage; the
    loss's dtype everywhere, so that the sum over pipeline ranks agrees)."""
    wide = torch.promote_types(settings.compute_dtype, torch.float32)
    zero = torch.zeros((), dtype=wide, device=batch.input_ids.device)
    ce = torch.stack(pipeline.sums.ce).sum() if pipeline.sums.ce else zero
    z = torch.stack(pipeline.sums.z).sum() if pipeline.sums.z else zero
    return ce, z


def _pipelines(settings: StepSettings, sharding: Sharding, *, forward_only: bool):
    """``pipeline_for(batch)``: this rank's pipeline for batches of that shape, built once per shape
    (a schedule's shapes are fixed; training uses one, evaluation another)."""
    block_fn = block_function(settings, sharding)
    built: dict[tuple[int, int], Pipeline] = {}

    def pipeline_for(batch: Batch) -> Pipeline:
        rows, seq = batch.input_ids.shape
        if (rows, seq) not in built:
            micro = rows if forward_only else min(settings.micro_batch_size, rows)  # any count: GPipe, BFS
            built[rows, seq] = build_pipeline(
                sharding,
                block_fn=block_fn,
                model_cfg=settings.model,
                micro_batch_rows=micro,
                n_micro_batches=rows // micro,
                seq_len=seq,
                compute_dtype=settings.compute_dtype,
                z_loss=settings.z_loss,
                loss_chunk_tokens=settings.loss_chunk_tokens,
                document_masking=settings.document_masking,
                backend=settings.attention_backend,
                device=batch.input_ids.device,
                forward_only=forward_only,
            )
        return built[rows, seq]

    return pipeline_for
