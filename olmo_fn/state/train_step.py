"""`train_step(state, batch) -> (state, metrics)`: one optimizer update over a batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from olmo_fn.graph.block import block_for
from olmo_fn.graph.config import ModelConfig
from olmo_fn.graph.model import AttentionBackend, loss_sums
from olmo_fn.graph.param_tree import flatten
from olmo_fn.io.batch import Batch
from olmo_fn.parallelize.compile import compile_block
from olmo_fn.parallelize.mixed_precision import compute_params
from olmo_fn.state.adamw import AdamWConfig, adamw_update
from olmo_fn.state.clip import clip_by_global_norm
from olmo_fn.state.schedule import ScheduleConfig, lr_at
from olmo_fn.state.train_state import TrainState

StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, torch.Tensor | float]]]


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What a train step needs besides the state and the batch; fixed for a run."""

    model: ModelConfig
    optim: AdamWConfig
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


def make_train_step(settings: StepSettings) -> StepFn:
    """A `train_step(state, batch)` closed over fixed settings.

    The batch is split into micro-batches of ``settings.micro_batch_size`` rows; their gradients
    accumulate, and the loss of every micro-batch is divided by the number of target tokens in the
    whole batch, so the update equals the one computed from the whole batch at once.

    The returned step consumes its input state: parameter and optimizer buffers are updated in place
    and belong to the returned state. Metrics are 0-dim tensors (no host sync) plus ``lr``: ``loss``
    (mean cross-entropy per target), ``z_loss`` (the weighted z-loss term added to it in the
    objective), ``logsumexp_sq`` (the unweighted mean of logsumexp(logits)², what z_loss weighs),
    ``grad_norm`` (before clipping) and ``n_targets``.
    """
    cfg = settings.model
    block_fn = compile_block(block_for(cfg)) if settings.compile else block_for(cfg)

    def objective(params, mb: Batch, n_targets: torch.Tensor):
        kwargs = {}
        if settings.document_masking:
            kwargs = {"positions": mb.positions, "doc_ids": mb.doc_ids}
        ce_sum, z_sum, _ = loss_sums(
            compute_params(params, settings.compute_dtype),
            mb.input_ids,
            mb.labels,
            cfg,
            backend=settings.attention_backend,
            block_fn=block_fn,
            **kwargs,
        )
        return (ce_sum + settings.z_loss * z_sum) / n_targets, ce_sum.detach(), z_sum.detach()

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        paths, leaves = zip(*flatten(state.params).items(), strict=True)
        n_targets = (batch.labels != -100).sum().clamp(min=1)
        grads: list[torch.Tensor] | None = None
        ce_sums, z_sums = [], []
        for mb in batch.split(settings.micro_batch_size):
            loss, ce_sum, z_sum = objective(state.params, mb, n_targets)
            mb_grads = torch.autograd.grad(loss, leaves)
            if grads is None:
                grads = list(mb_grads)
            else:
                torch._foreach_add_(grads, mb_grads)
            ce_sums.append(ce_sum)
            z_sums.append(z_sum)
        grad_norm = clip_by_global_norm(grads, settings.max_grad_norm)
        lr = lr_at(
            state.step, peak=settings.optim.lr, cfg=settings.schedule, total_steps=settings.total_steps
        )
        params, opt_state = adamw_update(
            state.params,
            dict(zip(paths, grads, strict=True)),
            state.opt_state,
            step=state.step + 1,
            lr=lr,
            cfg=settings.optim,
        )
        new_state = dataclasses.replace(
            state,
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            data_cursor=state.data_cursor + batch.input_ids.shape[0],
            tokens_seen=state.tokens_seen + batch.n_tokens,
        )
        metrics = {
            "loss": torch.stack(ce_sums).sum() / n_targets,
            # The z-loss as it enters the objective (weight included), and its unweighted mean.
            "z_loss": settings.z_loss * torch.stack(z_sums).sum() / n_targets,
            "logsumexp_sq": torch.stack(z_sums).sum() / n_targets,
            "grad_norm": grad_norm,
            "lr": lr,
            "n_targets": n_targets,
        }
        return new_state, metrics

    return train_step
