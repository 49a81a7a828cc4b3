"""Naive float64 reference implementations (written independently of olmo_fn.graph) and random inputs."""

from __future__ import annotations

import math

import torch

from olmo_fn.graph import init_params


def perturbed_params(cfg, seed=0, gen=None):
    """Random init with norm weights moved away from 1, so a swapped or skipped norm shows."""
    params = init_params(cfg, seed=seed, dtype=torch.float64)
    gen = gen or torch.Generator().manual_seed(seed)
    return params.apply(
        lambda t: t + 0.5 * torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.ndim == 1 else t
    )


def rms_norm(x, w, eps):
    x = x.double()
    return w.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rope(x, positions, theta):
    """x: (B, S, H, D); rotate (x[i], x[i + D/2]) as the complex number x[i] + j x[i + D/2]."""
    d = x.shape[-1]
    half = d // 2
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(half):
        freq = theta ** (-2.0 * i / d)
        angle = positions.double() * freq  # (B, S)
        rot = torch.polar(torch.ones_like(angle), angle)[:, :, None]
        z = torch.complex(x[..., i].double(), x[..., i + half].double()) * rot
        out[..., i], out[..., i + half] = z.real, z.imag
    return out


def random_doc_ids(batch, seq, gen, p_boundary=0.15):
    """(batch, seq) document ids starting at 0, a new document at each position with p_boundary."""
    starts = torch.rand(batch, seq, generator=gen) < p_boundary
    starts[:, 0] = False
    return torch.cumsum(starts.long(), dim=1)


def allowed(doc_ids, window=0):
    """(B, S, S) bool by brute force: key k visible from query q iff k <= q, same document, and
    (with a window) q - k < window."""
    b, s = doc_ids.shape
    mask = torch.zeros(b, s, s, dtype=torch.bool)
    for bi in range(b):
        for q in range(s):
            for k in range(q + 1):
                near = window == 0 or q - k < window
                mask[bi, q, k] = bool(doc_ids[bi, q] == doc_ids[bi, k]) and near
    return mask


def attend(q, k, v, mask):
    """q: (B, H, S, D); k, v: (B, KV, S, D); mask: (B, S, S) bool. Loops over heads, float64."""
    b, h, s, d = q.shape
    group = h // k.shape[1]
    out = torch.empty(b, h, s, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            scores = q[bi, hi].double() @ k[bi, hi // group].double().T / math.sqrt(d)
            scores = scores.masked_fill(~mask[bi], float("-inf"))
            out[bi, hi] = torch.softmax(scores, -1) @ v[bi, hi // group].double()
    return out


def attention(p, x, positions, mask, cfg):
    b, s, _ = x.shape
    x = x.double()
    q, k, v = (x @ p[n].double().T for n in ("w_q", "w_k", "w_v"))
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    q = rope(q.view(b, s, cfg.n_heads, -1), positions, cfg.rope_theta)
    k = rope(k.view(b, s, cfg.n_kv_heads, -1), positions, cfg.rope_theta)
    v = v.view(b, s, cfg.n_kv_heads, -1)
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
    return out.transpose(1, 2).reshape(b, s, -1) @ p["w_out"].double().T


def swiglu(p, x):
    x = x.double()
    gate = x @ p["w1"].double().T
    return (gate * torch.sigmoid(gate) * (x @ p["w3"].double().T)) @ p["w2"].double().T


def block(p, x, positions, mask, cfg):
    x = x.double()
    norm = cfg.norm_eps
    if cfg.block == "pre_norm":
        h = x + attention(p["attention"], rms_norm(x, p["attention_norm"], norm), positions, mask, cfg)
        return h + swiglu(p["feed_forward"], rms_norm(h, p["feed_forward_norm"], norm))
    h = x + rms_norm(attention(p["attention"], x, positions, mask, cfg), p["attention_norm"], norm)
    return h + rms_norm(swiglu(p["feed_forward"], h), p["feed_forward_norm"], norm)


def logits(params, ids, positions, doc_ids, cfg):
    """The whole model; layer i attends under allowed(doc_ids, cfg.layer_window(i))."""
    x = params["embeddings"].double()[ids]
    for i in range(cfg.n_layers):
        x = block(params["blocks"][str(i)], x, positions, allowed(doc_ids, cfg.layer_window(i)), cfg)
    w_out = params["embeddings"] if cfg.tie_embeddings else params["lm_head"]["w_out"]
    return rms_norm(x, params["lm_head"]["norm"], cfg.norm_eps) @ w_out.double().T


def cross_entropy_sums(logits, labels, ignore_index=-100):
    """Per-position loop: sum of -log softmax(logits)[label] and of logsumexp² over labelled positions."""
    flat, lab = logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1)
    ce = z = 0.0
    n = 0
    for row, y in zip(flat, lab.tolist(), strict=True):
        if y == ignore_index:
            continue
        lse = math.log(sum(math.exp(v) for v in row.tolist()))
        ce += lse - row[y].item()
        z += lse * lse
        n += 1
    return ce, z, n
