"""The PyTorch row backend: memory-lean, any device (the CPU path and the fallback).

Implements the row contract of `backends.py`. Rows are processed in chunks of about CHUNK_ELEMENTS
logits, so the float32 temporaries (a handful of chunk-sized tensors) stay in the tens of MB whatever
N and V are; the forward keeps only the (4, N) row statistics, and the backward writes each chunk of
the gradient straight into the caller's preallocated tensor.
"""
from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 1 << 21  # 8 MiB per float32 temporary


def _row_chunks(n_rows: int, vocab_size: int):
    rows = max(1, CHUNK_ELEMENTS // max(vocab_size, 1))
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


def _scaled(logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """a = z[:, :V] / tau in float32 (a view of float32 logits when tau == 1: never written to)."""
    scaled = logits[:, :vocab_size].to(torch.float32)
    return scaled if temperature == 1.0 else scaled / temperature


def _log_probs(logits: torch.Tensor, vocab_size: int, temperature: float):
    """(log p, lse) of a chunk of rows: the fused log_softmax, and lse = max(a) - max(log p)."""
    scaled = _scaled(logits, vocab_size, temperature)
    log_p = torch.log_softmax(scaled, dim=-1)
    return log_p, scaled.amax(dim=-1) - log_p.amax(dim=-1)


def _weighted_log_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor, shift=None) -> torch.Tensor:
    """p * (log p - log q - shift) elementwise, 0 where p == 0 (a fresh tensor). shift: (R, 1) or None."""
    out = log_p - log_q
    if shift is not None:
        out -= shift
    out *= p
    return out.masked_fill_(p == 0, 0.0)


def _log_mix(log_ps, log_pt, beta: float):
    """log((1 - beta) p_s + beta p_t)."""
    return torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))


def row_forward(student, teacher, vocab_size, temperature, divergence, beta):
    """Row statistics (4, N) float32: lse_s, lse_t, d, aux. See backends.py for the contract."""
    n = student.shape[0]
    stats = torch.empty(4, n, dtype=torch.float32, device=student.device)
    for rows in _row_chunks(n, vocab_size):
        log_ps, lse_s = _log_probs(student[rows], vocab_size, temperature)
        log_pt, lse_t = _log_probs(teacher[rows], vocab_size, temperature)
        aux = torch.zeros_like(lse_s)
        if divergence == "reverse_kl":
            d = _weighted_log_ratio(log_ps.exp(), log_ps, log_pt).sum(-1)
        elif divergence == "forward_kl":
            d = _weighted_log_ratio(log_pt.exp(), log_pt, log_ps).sum(-1)
        else:
            log_m = _log_mix(log_ps, log_pt, beta)
            aux = _weighted_log_ratio(log_ps.exp(), log_ps, log_m).sum(-1)
            kl_t = _weighted_log_ratio(log_pt.exp(), log_pt, log_m).sum(-1)
            d = beta * kl_t + (1 - beta) * aux
        stats[:, rows] = torch.stack((lse_s, lse_t, d, aux))
    return stats


def _row_gradients(log_ps, log_pt, d, aux, divergence, beta, want_teacher):
    """dd/da_s and dd/da_t (None unless want_teacher) for a chunk of rows, float32 (R, V)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    grad_t = None
    if divergence == "reverse_kl":
        grad_s = _weighted_log_ratio(ps, log_ps, log_pt, d[:, None])
        if want_teacher:
            grad_t = pt - ps
    elif divergence == "forward_kl":
        grad_s = ps - pt
        if want_teacher:
            grad_t = _weighted_log_ratio(pt, log_pt, log_ps, d[:, None])
    else:
        log_m = _log_mix(log_ps, log_pt, beta)
        grad_s = _weighted_log_ratio(ps, log_ps, log_m, aux[:, None]).mul_(1 - beta)
        if want_teacher:
            kl_t = (d - (1 - beta) * aux) / beta
            grad_t = _weighted_log_ratio(pt, log_pt, log_m, kl_t[:, None]).mul_(beta)
    return grad_s, grad_t


def _store(out: torch.Tensor, rows: slice, vocab_size: int, grad: torch.Tensor, scale: torch.Tensor) -> None:
    """out[rows, :V] = scale * grad (exact 0 where scale == 0), out[rows, V:] = 0. Overwrites grad."""
    scale = scale[:, None]
    out[rows, :vocab_size] = grad.mul_(scale).masked_fill_(scale == 0, 0.0)
    out[rows, vocab_size:] = 0


def row_backward(student, teacher, stats, coef, vocab_size, temperature, divergence, beta,
                 grad_student, grad_teacher):
    """Write coef * dd/dz into grad_student (and grad_teacher). See backends.py for the contract."""
    want_teacher = grad_teacher is not None
    for rows in _row_chunks(student.shape[0], vocab_size):
        lse_s, lse_t, d, aux = stats[:, rows]
        log_ps = _scaled(student[rows], vocab_size, temperature) - lse_s[:, None]
        log_pt = _scaled(teacher[rows], vocab_size, temperature) - lse_t[:, None]
        grad_s, grad_t = _row_gradients(log_ps, log_pt, d, aux, divergence, beta, want_teacher)
        scale = coef[rows] / temperature
        _store(grad_student, rows, vocab_size, grad_s, scale)
        if want_teacher:
            _store(grad_teacher, rows, vocab_size, grad_t, scale)
