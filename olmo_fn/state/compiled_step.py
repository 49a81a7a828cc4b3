"""Whole-step compilation: forward, loss, backward, clipping and the AdamW update as one graph.

``--compile on`` compiles the transformer block (regional compilation). ``--compile step`` compiles the
whole update instead: the gradient is taken with `torch.func.grad_and_value` inside the compiled
function, so the compiler traces forward and backward together (no autograd tape between them), and
the optimizer's multi-tensor update follows in the same graph. The learning rate and step count enter
as tensors, so the graph compiles once for a run. One process only; the masks and RoPE tables of each
micro-batch are made outside the graph and passed in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from olmo_fn.errors import ConfigError
from olmo_fn.graph.block import block_for
from olmo_fn.graph.model import layer_inputs, loss_sums
from olmo_fn.graph.param_tree import flatten, param_shapes, unflatten_dicts
from olmo_fn.io.batch import Batch
from olmo_fn.state.adamw import decays
from olmo_fn.state.schedule import lr_at
from olmo_fn.state.train_state import TrainState


def step_compile_problems(settings: Any, sharded: bool) -> list[str]:
    """Why ``compile=step`` cannot run with these settings (empty if it can)."""
    problems = []
    if sharded:
        problems.append("compile=step runs in one process; under a placement plan use compile=on")
    if settings.ac != "none":
        problems.append(
            f"compile=step with ac={settings.ac}: the whole-step graph has no checkpointed regions "
            "(the compiler plans its own memory); use compile=on with --ac, or --ac none"
        )
    if settings.fp8 != "none":
        problems.append("compile=step with fp8 is not supported yet (use compile=on)")
    spike = getattr(settings, "spike", None)  # bench settings have no spike skipping
    if spike is not None and spike.sigmas:
        problems.append("compile=step cannot skip spiking steps (spike.sigmas > 0): use compile=on")
    if settings.optim.name != "adamw":
        problems.append(f"compile=step traces AdamW only; optim.name={settings.optim.name} needs compile=on")
    return problems


def make_compiled_train_step(settings):
    """A `train_step(state, batch)` like `make_train_step`'s, computed by one compiled graph per
    batch shape. `settings` is a `StepSettings` with ``compile_step`` set."""
    problems = step_compile_problems(settings, sharded=False)
    if problems:
        raise ConfigError("; ".join(problems))
    cfg, optim = settings.model, settings.optim
    block_fn = block_for(cfg)

    def objective(leaves: dict[str, torch.Tensor], ids, labels, inputs, n_targets):
        view = unflatten_dicts({k: t.to(settings.compute_dtype) for k, t in leaves.items()})
        ce, z, _ = loss_sums(
            view,
            ids,
            labels,
            cfg,
            backend=settings.attention_backend,
            block_fn=block_fn,
            inputs=inputs,
            loss_chunk_tokens=settings.loss_chunk_tokens,
        )
        return (ce + settings.z_loss * z) / n_targets, (ce.detach(), z.detach())

    grad_and_value = torch.func.grad_and_value(objective, has_aux=True)
    decay_of = {path: decays(path, optim) for path in param_shapes(cfg)}  # decided once, outside the graph

    def update(leaves, exp_avg, exp_avg_sq, micro_batches, n_targets, lr, step):
        grads, ce_sum, z_sum = None, 0.0, 0.0
        for ids, labels, inputs in micro_batches:
            mb_grads, (_, (ce, z)) = grad_and_value(leaves, ids, labels, inputs, n_targets)
            grads = mb_grads if grads is None else {k: grads[k] + mb_grads[k] for k in grads}
            ce_sum, z_sum = ce_sum + ce, z_sum + z
        paths = list(leaves)
        g = [grads[k] for k in paths]
        wide = torch.promote_types(g[0].dtype, torch.float32)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g, dtype=wide)))
        if settings.max_grad_norm is not None and settings.max_grad_norm > 0:
            torch._foreach_mul_(g, torch.clamp(settings.max_grad_norm / (norm + 1e-6), max=1.0))
        with torch.no_grad():
            for decay in (True, False):
                keys = [i for i, k in enumerate(paths) if decay_of[k] == decay]
                if keys:
                    _adamw_tensor_lr(
                        [leaves[paths[i]] for i in keys],
                        [g[i] for i in keys],
                        [exp_avg[paths[i]] for i in keys],
                        [exp_avg_sq[paths[i]] for i in keys],
                        lr=lr,
                        step=step,
                        weight_decay=optim.weight_decay if decay else 0.0,
                        cfg=optim,
                    )
        return norm, ce_sum, z_sum

    compiled = torch.compile(update, dynamic=False, fullgraph=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        n_targets = (batch.labels != -100).sum().clamp(min=1)
        micro_batches = []
        for mb in batch.split(settings.micro_batch_size):
            positions = mb.positions if settings.document_masking else None
            doc_ids = mb.doc_ids if settings.document_masking else None
            inputs = layer_inputs(
                mb.input_ids, cfg, list(range(cfg.n_layers)), positions, doc_ids, settings.attention_backend
            )
            micro_batches.append((mb.input_ids, mb.labels, inputs))
        lr = lr_at(state.step, peak=optim.lr, cfg=settings.schedule, total_steps=settings.total_steps)
        device = batch.input_ids.device
        # Detached views of the same storage: the graph updates them in place, and the compiler sees
        # a function that needs no autograd of its own (its gradient is taken inside).
        norm, ce_sum, z_sum = compiled(
            {k: t.detach() for k, t in flatten(state.params).items()},
            flatten(state.opt_state["exp_avg"]),
            flatten(state.opt_state["exp_avg_sq"]),
            micro_batches,
            n_targets,
            torch.tensor(lr, dtype=torch.float64, device=device),
            torch.tensor(state.step + 1, dtype=torch.float64, device=device),
        )
        new_state = dataclasses.replace(
            state,
            step=state.step + 1,
            data_cursor=state.data_cursor + batch.input_ids.shape[0],
            tokens_seen=state.tokens_seen + batch.n_tokens,
        )
        metrics = {
            "loss": ce_sum / n_targets,
            "z_loss": settings.z_loss * z_sum / n_targets,
            "logsumexp_sq": z_sum / n_targets,
            "grad_norm": norm,
            "lr": lr,
            "n_targets": n_targets,
        }
        return new_state, metrics

    return train_step


def _adamw_tensor_lr(p, g, m, v, *, lr, step, weight_decay, cfg):
    """`olmo_fn.state.adamw`'s foreach update with the learning rate and step as 0-dim float64
    tensors (so a compiled graph does not specialise on them)."""
    bias1 = 1 - cfg.beta1**step
    bias2_sqrt = (1 - cfg.beta2**step) ** 0.5
    if weight_decay:
        torch._foreach_mul_(p, (1 - lr * weight_decay).to(p[0].dtype))
    torch._foreach_lerp_(m, g, 1 - cfg.beta1)
    torch._foreach_mul_(v, cfg.beta2)
    torch._foreach_addcmul_(v, g, g, 1 - cfg.beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bias2_sqrt.to(p[0].dtype))
    torch._foreach_add_(denom, cfg.eps)
    step_size = (-lr / bias1).to(p[0].dtype)
    torch._foreach_mul_(denom, 1 / step_size)  # p += m / (denom / step_size)
    torch._foreach_addcdiv_(p, m, denom)
