"""The PyTorch row backend: memory-lean, any device (the CPU path and the fallback).

Implements the row contract of `contract.py`. Rows are processed in chunks of about CHUNK_ELEMENTS
logits (never across a batch row, so each chunk is a plain 2-D view of the caller's tensor), so the
float32 temporaries (a handful of chunk-sized tensors) stay in the tens of MB whatever N and V are; the
forward keeps only the row statistics, and the backward writes each chunk of the gradient straight into
the gradient tensor the caller hands in. Rows whose mask is False are computed with their chunk but stored as exact
zeros (selecting rows would need their count on the host).
"""
from __future__ import annotations

import math

import torch

from ..config import BUCKET, FORWARD_KL, REVERSE_KL
from .contract import NUM_STATS, RowCall, Stat, TopKCall, define_row_ops, define_topk_ops

CHUNK_ELEMENTS = 1 << 21  # 8 MiB per float32 temporary


def _chunks(rows_2d: int, length: int, vocab_size: int):
    """(flat row slice, batch index, position slice) of each chunk of a (B, T, .) row grid."""
    per_chunk = max(1, CHUNK_ELEMENTS // max(vocab_size, 1))
    for b in range(rows_2d):
        for t0 in range(0, length, per_chunk):
            t1 = min(t0 + per_chunk, length)
            yield slice(b * length + t0, b * length + t1), b, slice(t0, t1)


def _log_probs(logits: torch.Tensor, call: RowCall):
    """(log p, max z, logsum) of a chunk of rows (R, V*): log_softmax of (z - max z) / tau, so that the
    scaling by 1 / tau never meets the logits' common offset; logsum = -max(log p) (at the argmax,
    z = max z and log p = -logsum)."""
    z = logits[:, :call.vocab_size].to(torch.float32)
    max_z = z.amax(dim=-1)
    shifted = z - max_z[:, None]
    log_p = torch.log_softmax(shifted if call.temperature == 1.0 else shifted.div_(call.temperature), dim=-1)
    return log_p, max_z, -log_p.amax(dim=-1)


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


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row of a chunk (R, V) -> (R,) (0 log 0 = 0)."""
    return -(log_p.exp() * log_p).nan_to_num_(nan=0.0).sum(-1)


def _mix_divergences(log_ps, log_pt, beta: float):
    """(K_s, K_t) = (KL(p_s || mix), KL(p_t || mix)) per row of a chunk (R, V) -> (R,), (R,)."""
    log_m = _log_mix(log_ps, log_pt, beta)
    return (_weighted_log_ratio(log_ps.exp(), log_ps, log_m).sum(-1),
            _weighted_log_ratio(log_pt.exp(), log_pt, log_m).sum(-1))


def row_forward(student, teacher, mask, call: RowCall):
    """Row statistics (NUM_STATS, N) float32 per the contract."""
    batch, length = student.shape[:2]
    stats = torch.empty(NUM_STATS, batch * length, dtype=torch.float32, device=student.device)
    for rows, b, span in _chunks(batch, length, call.vocab_size):
        log_ps, max_s, logsum_s = _log_probs(student[b, span], call)
        log_pt, max_t, logsum_t = _log_probs(teacher[b, span], call)
        mix_s, mix_t = torch.zeros_like(max_s), torch.zeros_like(max_s)
        if call.divergence == REVERSE_KL:
            d = _weighted_log_ratio(log_ps.exp(), log_ps, log_pt).sum(-1)
        elif call.divergence == FORWARD_KL:
            d = _weighted_log_ratio(log_pt.exp(), log_pt, log_ps).sum(-1)
        else:
            mix_s, mix_t = _mix_divergences(log_ps, log_pt, call.beta)
            d = call.beta * mix_t + (1 - call.beta) * mix_s
        tail = torch.zeros_like(max_s)  # top-k rows only
        values = torch.stack((max_s, logsum_s, max_t, logsum_t, d, mix_s, mix_t, _entropy(log_ps), tail))
        stats[:, rows] = torch.where(mask[rows], values, torch.zeros_like(values))
    return stats


def _log_p(logits: torch.Tensor, max_z: torch.Tensor, logsum: torch.Tensor, call: RowCall) -> torch.Tensor:
    """log p = (z - max z) / tau - logsum, float32 (R, V)."""
    shifted = logits[:, :call.vocab_size].to(torch.float32) - max_z[:, None]
    if call.temperature != 1.0:
        shifted /= call.temperature
    return shifted.sub_(logsum[:, None])


def _chunks_given_normalisers(student, teacher, stats, call: RowCall):
    """(flat row slice, batch index, position slice, the chunk's stats, log p_s, log p_t) of each chunk, with the
    normalisers MAX_* and LOGSUM_* read from `stats`."""
    batch, length = student.shape[:2]
    for rows, b, span in _chunks(batch, length, call.vocab_size):
        st = stats[:, rows]
        yield (rows, b, span, st, _log_p(student[b, span], st[Stat.MAX_S], st[Stat.LOGSUM_S], call),
               _log_p(teacher[b, span], st[Stat.MAX_T], st[Stat.LOGSUM_T], call))


def row_mix(student, teacher, mask, stats, call: RowCall):
    """(K_s, K_t) (2, N) float32 per the contract: over the call's columns, with the normalisers of `stats`."""
    mixes = torch.empty(2, student.shape[0] * student.shape[1], dtype=torch.float32, device=student.device)
    for rows, _, _, _, log_ps, log_pt in _chunks_given_normalisers(student, teacher, stats, call):
        values = torch.stack(_mix_divergences(log_ps, log_pt, call.beta))
        mixes[:, rows] = torch.where(mask[rows], values, torch.zeros_like(values))
    return mixes


def _row_gradients(log_ps, log_pt, stats, call: RowCall, want_teacher: bool):
    """dd/da_s and dd/da_t (None unless want_teacher) for a chunk of rows, float32 (R, V)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    d = stats[Stat.KL][:, None]
    grad_t = None
    if call.divergence == REVERSE_KL:
        grad_s = _weighted_log_ratio(ps, log_ps, log_pt, d)
        if want_teacher:
            grad_t = pt - ps
    elif call.divergence == FORWARD_KL:
        grad_s = ps - pt
        if want_teacher:
            grad_t = _weighted_log_ratio(pt, log_pt, log_ps, d)
    else:
        log_m = _log_mix(log_ps, log_pt, call.beta)
        grad_s = _weighted_log_ratio(ps, log_ps, log_m, stats[Stat.MIX_S][:, None]).mul_(1 - call.beta)
        if want_teacher:
            grad_t = _weighted_log_ratio(pt, log_pt, log_m, stats[Stat.MIX_T][:, None]).mul_(call.beta)
    return grad_s, grad_t


def _store(out: torch.Tensor, vocab_size: int, grad: torch.Tensor, scale: torch.Tensor) -> None:
    """out[:, :V] = scale * grad (exact 0 where scale == 0), out[:, V:] = 0, for a chunk of rows `out`
    (a view of the gradient). Overwrites grad."""
    scale = scale[:, None]
    out[:, :vocab_size] = grad.mul_(scale).masked_fill_(scale == 0, 0.0)
    out[:, vocab_size:] = 0


def row_backward(student, teacher, stats, coef, call: RowCall, grad_student, grad_teacher) -> None:
    """Write coef * dd/dz into grad_student (and grad_teacher unless None) per the contract."""
    for rows, b, span, st, log_ps, log_pt in _chunks_given_normalisers(student, teacher, stats, call):
        grad_s, grad_t = _row_gradients(log_ps, log_pt, st, call, grad_teacher is not None)
        scale = coef[rows] / call.temperature
        _store(grad_student[b, span], call.vocab_size, grad_s, scale)
        if grad_teacher is not None:
            _store(grad_teacher[b, span], call.vocab_size, grad_t, scale)


OPS = define_row_ops("torch", row_forward, row_backward, mix=row_mix)


# ---------------------------------------------------------------------------------------------------
# Top-k teacher rows (contract.py, "Top-k teacher rows")
# ---------------------------------------------------------------------------------------------------
TAIL_FLOOR = 1e-7  # SPEC: both tails are floored at 1e-7


def _slots(logits, logprobs, ids):
    """(live (R, k), the slots' column index (R, k) int64 (0 at padding), the slots' logits (R, k) float32)."""
    live = logprobs > float("-inf")
    index = torch.where(live, ids, 0).to(torch.int64)
    return live, index, logits.gather(-1, index).to(torch.float32)


def _slot_normalisers(z_slots, live, call: TopKCall):
    """renormalize's MAX_S and LOGSUM_S: over the live slots (0, 0 for a row without one)."""
    any_live = live.any(-1)
    max_z = torch.where(any_live, torch.where(live, z_slots, float("-inf")).amax(-1), 0.0)
    shifted = torch.where(live, (z_slots - max_z[:, None]) / call.temperature, float("-inf"))
    return max_z, torch.where(any_live, torch.logsumexp(shifted, -1), 0.0)


def _categories(z_slots, live, logprobs, max_z, logsum, rest, call: TopKCall):
    """(log P (R, k + 1), log Q (R, k + 1), free (R,): the student's tail is not floored) of a chunk of rows;
    column k is the tail (-inf for renormalize). rest: the student's mass outside the live slots (TAIL_S)."""
    log_p = torch.where(live, (z_slots - max_z[:, None]) / call.temperature - logsum[:, None], float("-inf"))
    log_q = logprobs.to(torch.float32)
    if call.tail == BUCKET:
        log_p = torch.cat((log_p, rest.clamp(min=TAIL_FLOOR).log()[:, None]), -1)
        log_q = torch.cat((log_q, (1 - log_q.exp().sum(-1)).clamp(min=TAIL_FLOOR).log()[:, None]), -1)
        return log_p, log_q, rest > TAIL_FLOOR
    log_q = log_q - torch.logsumexp(log_q, -1, keepdim=True).nan_to_num(neginf=0.0)
    no_tail = log_p.new_full((log_p.shape[0], 1), float("-inf"))
    return torch.cat((log_p, no_tail), -1), torch.cat((log_q, no_tail), -1), torch.zeros_like(live[:, 0])


def _slot_columns(index, live, width: int):
    """(R, width) bool: the columns of the live slots (a padding slot's index, 0, marks nothing)."""
    marks = torch.zeros(index.shape[0], width, dtype=torch.float32, device=index.device)
    return marks.scatter_add_(-1, index, live.to(torch.float32)) > 0


def _category_divergence(log_p, log_q, call):
    """d over the categories (R, C) of log-probabilities (0 log 0 = 0)."""
    if call.divergence == REVERSE_KL:
        return _weighted_log_ratio(log_p.exp(), log_p, log_q).sum(-1)
    if call.divergence == FORWARD_KL:
        return _weighted_log_ratio(log_q.exp(), log_q, log_p).sum(-1)
    mix_p, mix_q = _mix_divergences(log_p, log_q, call.beta)
    return call.beta * mix_q + (1 - call.beta) * mix_p


def _category_weights(log_p, log_q, call):
    """P_c g_c (R, C): the categories' P times the derivative of d with respect to P (contract.py)."""
    p = log_p.exp()
    if call.divergence == REVERSE_KL:
        return _weighted_log_ratio(p, log_p, log_q, -1.0)
    if call.divergence == FORWARD_KL:
        return -log_q.exp()
    return _weighted_log_ratio(p, log_p, _log_mix(log_p, log_q, call.beta)).mul_(1 - call.beta)


def topk_forward(student, logprobs, ids, mask, call: TopKCall):
    """Row statistics (NUM_STATS, N) float32 per the contract's top-k rows."""
    stats = torch.zeros(NUM_STATS, student.shape[0] * student.shape[1], dtype=torch.float32, device=student.device)
    for rows, b, span in _chunks(student.shape[0], student.shape[1], call.vocab_size):
        z = student[b, span, :call.vocab_size].to(torch.float32)
        log_p_row, max_z, logsum = _log_probs(z, call)
        live, index, z_slots = _slots(z, logprobs[b, span], ids[b, span])
        if call.tail == BUCKET:  # the mass outside the slots, summed directly (no 1 - sum_S P_j)
            rest = log_p_row.exp().masked_fill_(_slot_columns(index, live, z.shape[-1]), 0.0).sum(-1)
        else:
            max_z, logsum = _slot_normalisers(z_slots, live, call)
            rest = torch.zeros_like(max_z)
        log_p, log_q, _ = _categories(z_slots, live, logprobs[b, span], max_z, logsum, rest, call)
        d = torch.where(live.any(-1), _category_divergence(log_p, log_q, call), 0.0)  # no slot: d = 0 exactly
        values = torch.stack((max_z, logsum, d, _entropy(log_p_row), rest))
        stats[[Stat.MAX_S, Stat.LOGSUM_S, Stat.KL, Stat.ENTROPY_S, Stat.TAIL_S], rows] = \
            torch.where(mask[rows], values, torch.zeros_like(values))
    return stats


def topk_backward(student, logprobs, ids, stats, coef, call: TopKCall, grad_student) -> None:
    """Write coef * dd/dz into grad_student per the contract's top-k rows (renormalize reads only the slots)."""
    bucket = call.tail == BUCKET
    for rows, b, span in _chunks(student.shape[0], student.shape[1], call.vocab_size if bucket else ids.shape[-1]):
        chunk, st = student[b, span], stats[:, rows]
        live, index, z_slots = _slots(chunk, logprobs[b, span], ids[b, span])
        log_p, log_q, free = _categories(z_slots, live, logprobs[b, span], st[Stat.MAX_S], st[Stat.LOGSUM_S],
                                         st[Stat.TAIL_S], call)
        weights = _category_weights(log_p, log_q, call)
        w_slots = weights[:, :-1].sum(-1, keepdim=True)
        w_tail = torch.where(free, weights[:, -1], 0.0)[:, None]
        slot = weights[:, :-1] - log_p[:, :-1].exp() * (w_slots + w_tail)
        if bucket:  # -p_v G at the other columns
            g_tail = torch.where(free, weights[:, -1] / log_p[:, -1].exp(), 0.0)[:, None]
            grad = _log_p(chunk, st[Stat.MAX_S], st[Stat.LOGSUM_S], call).exp_().mul_(-(w_slots + w_tail - g_tail))
            grad.masked_fill_(_slot_columns(index, live, call.vocab_size), 0.0)
        else:
            grad = torch.zeros(chunk.shape[0], call.vocab_size, dtype=torch.float32, device=chunk.device)
        grad.scatter_add_(-1, index, torch.where(live, slot, 0.0))  # the slots' columns hold 0 before
        _store(grad_student[b, span], call.vocab_size, grad, coef[rows] / call.temperature)


TOPK_OPS = define_topk_ops("torch", topk_forward, topk_backward)
