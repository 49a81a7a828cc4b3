"""Language-model losses: cross-entropy with an ignore index, and z-loss."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Label value of positions that carry no target (padding, the last position of an instance)."""


def cross_entropy_sums(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed losses over the target positions, for normalising by a whole batch's target count.

    logits: (..., vocab) any float dtype, computed in at least fp32; labels: (...) int, with
    `ignore_index` where there is no target.
    Returns fp32 scalars ``(ce_sum, z_sum, n_targets)``: the sum of ``logsumexp(logits) - logit[label]``,
    the sum of ``logsumexp(logits)²`` (z-loss), and the number of targets.
    """
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat_labels = labels.reshape(-1)
    ce_sum, z_sum, _ = _CrossEntropyZ.apply(wide.reshape(-1, wide.shape[-1]), flat_labels, ignore_index)
    return ce_sum, z_sum, (flat_labels != ignore_index).sum()


def _sums(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """(ce_sum, z_sum, lse) of wide logits (T, vocab) and labels (T,)."""
    valid = labels != ignore_index
    index = torch.where(valid, labels, 0)[:, None]
    # One fused pass over the logits: logsumexp is any logit minus its log-softmax.
    target_logp = torch.log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)
    lse = logits.gather(-1, index).squeeze(-1) - target_logp
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    ce_sum = torch.where(valid, -target_logp, zero).sum()
    z_sum = torch.where(valid, lse.square(), zero).sum()
    return ce_sum, z_sum, lse


def _logits_grad(logits, labels, lse, grad_ce, grad_z, ignore_index: int) -> torch.Tensor:
    """The gradient of ``g_ce * ce_sum + g_z * z_sum`` in wide logits (T, vocab): at a target position
    ``softmax * (g_ce + 2 g_z lse) - g_ce * onehot(label)``, 0 elsewhere. Two passes over the logits:
    one fused softmax, one scaling by a per-position coefficient."""
    valid = labels != ignore_index
    coef = torch.where(valid, grad_ce + grad_z * 2 * lse, 0)
    grad = torch.softmax(logits, dim=-1).mul_(coef[:, None])
    rows = torch.arange(labels.shape[0], device=labels.device)
    grad[rows, torch.where(valid, labels, 0)] -= torch.where(valid, grad_ce, 0)
    return grad


class _CrossEntropyZ(torch.autograd.Function):
    """`cross_entropy_sums` on wide (T, vocab) logits with a backward of two passes over the logits
    (autograd's of logsumexp and gather takes five, and fills a zero tensor of the logits' size)."""

    @staticmethod
    def forward(logits, labels, ignore_index):
        return _sums(logits, labels, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, ignore_index = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(logits, labels, output[2])
        ctx.ignore_index = ignore_index

    @staticmethod
    def backward(ctx, grad_ce, grad_z, _grad_lse):
        logits, labels, lse = ctx.saved_tensors
        return _logits_grad(logits, labels, lse, grad_ce, grad_z, ctx.ignore_index), None, None


def linear_cross_entropy_sums(
    h: torch.Tensor,
    w_out: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cross_entropy_sums` of the logits ``h @ w_out.T``, computed `chunk_tokens` positions at a time,
    so that neither the whole logits nor their gradient is ever held.

    h: (..., d) the normed hidden states in the compute dtype; w_out: (vocab, d); labels: (...) int.
    Each chunk's logits are made in h's dtype and upcast to fp32 (as `cross_entropy_sums` does with
    the whole logits); backward makes them again, chunk by chunk, from the per-position logsumexp kept
    from forward. Peak extra memory: a chunk's logits and their gradient, about
    ``3 * chunk_tokens * vocab`` fp32 values. Returns fp32 ``(ce_sum, z_sum, n_targets)``; ce_sum and
    z_sum are differentiable in h and w_out with any weights.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    flat_h = h.reshape(-1, h.shape[-1])
    flat_labels = labels.reshape(-1)
    ce_sum, z_sum, _ = _LinearCrossEntropy.apply(flat_h, w_out, flat_labels, chunk_tokens, ignore_index)
    return ce_sum, z_sum, (flat_labels != ignore_index).sum()


def _chunk_logits(h: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    logits = h @ w_out.T
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class _LinearCrossEntropy(torch.autograd.Function):
    """Sums of cross-entropy and z-loss of ``h @ w.T`` over chunks of positions; see
    `linear_cross_entropy_sums`. Forward also returns the per-position logsumexp (not differentiable)
    for backward. The gradient of the logits of position t is
    ``g_ce * (softmax - onehot(label)) + g_z * 2 * lse * softmax`` at target positions, 0 elsewhere."""

    @staticmethod
    def forward(h, w, labels, chunk_tokens, ignore_index):
        lse_chunks, ce_sum, z_sum = [], None, None
        for start in range(0, h.shape[0], chunk_tokens):
            logits = _chunk_logits(h[start : start + chunk_tokens], w)
            ce, z, lse = _sums(logits, labels[start : start + chunk_tokens], ignore_index)
            ce_sum = ce if ce_sum is None else ce_sum + ce
            z_sum = z if z_sum is None else z_sum + z
            lse_chunks.append(lse)
            del logits
        wide = torch.promote_types(h.dtype, torch.float32)
        if ce_sum is None:  # no positions at all
            ce_sum = z_sum = torch.zeros((), dtype=wide, device=h.device)
        lse = torch.cat(lse_chunks) if lse_chunks else torch.zeros(0, dtype=wide, device=h.device)
        return ce_sum, z_sum, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, w, labels, chunk_tokens, ignore_index = inputs
        lse = output[2]
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(h, w, labels, lse)
        ctx.chunk_tokens, ctx.ignore_index = chunk_tokens, ignore_index

    @staticmethod
    def backward(ctx, grad_ce, grad_z, _grad_lse):
        h, w, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk_tokens
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
        for start in range(0, h.shape[0], chunk):
            h_chunk = h[start : start + chunk]
            logits = _chunk_logits(h_chunk, w)
            lab, lse_chunk = labels[start : start + chunk], lse[start : start + chunk]
            grad_logits = _logits_grad(logits, lab, lse_chunk, grad_ce, grad_z, ctx.ignore_index)
            del logits
            grad_logits = grad_logits.to(h.dtype)
            if grad_h is not None:
                torch.matmul(grad_logits, w, out=grad_h[start : start + chunk])
            if grad_w.dtype == h.dtype:
                grad_w.addmm_(grad_logits.T, h_chunk)
            else:  # a low-precision matmul per chunk, summed over the chunks in fp32
                grad_w += (grad_logits.T @ h_chunk).to(grad_w.dtype)
            del grad_logits
        grad_w = grad_w.to(w.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None
