"""The semantics of `fused_window_kl` (docs/SPEC.md) as plain float64 PyTorch.

Written for reading, not for speed: full log-softmaxes, and explicit loops over positions for the
window score and the guidance spread. Differentiable through d_t only (the weights are detached, as the
SPEC says). Every backend is tested against this function; it is also usable on its own, on any device.
"""
from __future__ import annotations

import torch

from .config import Quantile, WindowKLStats, config_signature, split_config
from .forms import TopK
from .layout import flatten_inputs

_REFERENCE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _sum_p_log_ratio(p, log_p, log_q):
    """sum_v p_v (log p_v - log q_v), with terms where p_v == 0 equal to 0 (and gradient-safe)."""
    live = p > 0
    return (p * (torch.where(live, log_p, 0.0) - torch.where(live, log_q, 0.0))).sum(-1)


def token_divergence(student, teacher, divergence: str, beta: float, temperature: float, dtype=torch.float64):
    """Per-row divergence d. student, teacher: (R, V) logits -> (R,).

    Computed in `dtype` (float64 for the reference); dtype=None keeps each input's own dtype, as plain
    PyTorch would (the tests' low-precision yardstick).
    """
    log_ps = torch.log_softmax((student if dtype is None else student.to(dtype)) / temperature, dim=-1)
    log_pt = torch.log_softmax((teacher if dtype is None else teacher.to(dtype)) / temperature, dim=-1)
    return category_divergence(log_ps, log_pt, divergence, beta)


def topk_divergence(student, topk: TopK, divergence: str, beta: float, temperature: float, dtype=torch.float64):
    """Per-row divergence d against a top-k teacher (SPEC "Top-k teacher"). student: (R, V) logits, topk's
    tensors (R, k) -> (R,). dtype as in `token_divergence`."""
    student = student if dtype is None else student.to(dtype)
    logprobs = topk.logprobs if dtype is None else topk.logprobs.to(dtype)
    live = logprobs > float("-inf")
    z_slots = student.gather(-1, torch.where(live, topk.token_ids, 0).long()) / temperature
    if topk.tail == "renormalize":  # the live slots only, each side renormalised
        empty = ~live.any(-1, keepdim=True)  # no category: d = 0 (kept away from log_softmax of all -inf)
        log_ps = torch.log_softmax(torch.where(live | empty, z_slots, float("-inf")), dim=-1)
        log_pt = torch.log_softmax(torch.where(live | empty, logprobs, float("-inf")), dim=-1)
        return category_divergence(log_ps.masked_fill(empty, float("-inf")), log_pt.masked_fill(empty, float("-inf")),
                                   divergence, beta)
    log_ps = torch.where(live, z_slots - torch.logsumexp(student / temperature, dim=-1, keepdim=True), float("-inf"))
    # The remaining mass, floored at 1e-7 (clamp passes no gradient where the floor is active).
    tail_s = (1 - log_ps.exp().sum(-1, keepdim=True)).clamp(min=1e-7)
    tail_t = (1 - torch.where(live, logprobs.exp(), 0.0).sum(-1, keepdim=True)).clamp(min=1e-7)
    return category_divergence(torch.cat((log_ps, tail_s.log()), -1), torch.cat((logprobs, tail_t.log()), -1),
                               divergence, beta)


def student_entropy(student, temperature: float, dtype=torch.float64):
    """-sum_v p_s log p_s per row at temperature tau. student: (R, V) logits -> (R,)."""
    log_p = torch.log_softmax((student if dtype is None else student.to(dtype)) / temperature, dim=-1)
    return -(log_p.exp() * torch.where(log_p > float("-inf"), log_p, 0.0)).sum(-1)


def category_divergence(log_ps, log_pt, divergence: str, beta: float):
    """d of two distributions over the same categories, given as log-probabilities (R, C) -> (R,)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    if divergence == "reverse_kl":
        return _sum_p_log_ratio(ps, log_ps, log_pt)
    if divergence == "forward_kl":
        return _sum_p_log_ratio(pt, log_pt, log_ps)
    mix = (1 - beta) * ps + beta * pt
    log_mix = torch.where(mix > 0, mix, 1.0).log()  # mix == 0 only where p_s == p_t == 0 (terms dropped)
    return beta * _sum_p_log_ratio(pt, log_pt, log_mix) + (1 - beta) * _sum_p_log_ratio(ps, log_ps, log_mix)


def _threshold_value(threshold, values, valid):
    if threshold is None:
        return None
    if isinstance(threshold, Quantile):
        chosen = values[valid]
        if threshold.group is not None:  # every rank's valid values
            gathered = [None] * torch.distributed.get_world_size(threshold.group)
            torch.distributed.all_gather_object(gathered, chosen, group=threshold.group)
            chosen = torch.cat(gathered)
        if chosen.numel() == 0:
            return None
        return torch.quantile(chosen, threshold.q).item()
    return threshold


@config_signature
def window_kl_reference(student_logits, teacher_logits, *, mask=None, labels=None, ignore_index=-100,
                        cu_seqlens=None, return_stats=False, backend="reference", **config):
    """`fused_window_kl` in float64, written plainly. Same arguments; `backend` is ignored.

    student_logits, teacher_logits: (B, T, Vs), (B, T, Vt) or (N, Vs), (N, Vt).
    Returns the float64 loss (shape of `mask` for reduction="none", else a scalar), and with
    return_stats=True also a WindowKLStats in the layout of `mask`.
    """
    cfg, unknown = split_config(config)
    if unknown:
        raise TypeError(f"window_kl_reference: unexpected keyword argument(s) {sorted(unknown)}")
    rows = flatten_inputs(student_logits, teacher_logits, mask, cu_seqlens, cfg, dtypes=_REFERENCE_DTYPES,
                          labels=labels, ignore_index=ignore_index)
    n, k, V = rows.mask.numel(), cfg.window, rows.vocab_size
    valid = rows.mask.cpu()
    seq = rows.seq_id.cpu().tolist()

    # d_t, computed on the valid rows only so that invalid rows get exactly zero gradient.
    d = torch.zeros(n, dtype=torch.float64, device=rows.student.device)
    index = valid.nonzero().flatten().to(d.device)
    student = rows.student.flatten(0, 1)[index, :V]
    if isinstance(rows.teacher, TopK):
        topk = TopK(rows.teacher.token_ids.flatten(0, 1)[index], rows.teacher.logprobs.flatten(0, 1)[index],
                    rows.teacher.tail)
        d_valid = topk_divergence(student, topk, cfg.divergence, cfg.beta, cfg.temperature)
    else:
        d_valid = token_divergence(student, rows.teacher.flatten(0, 1)[index, :V], cfg.divergence, cfg.beta,
                                   cfg.temperature)
    d = d.index_put((index,), d_valid)
    entropy = torch.zeros(n, dtype=torch.float64, device=d.device).index_put(
        (index,), student_entropy(student, cfg.temperature).detach())
    d_val = d.detach().cpu()
    m = valid.double()
    d_list, m_list = d_val.tolist(), m.tolist()

    # Sequence ends (exclusive) and starts of every row.
    end, start = [0] * n, [0] * n
    for t in range(n - 1, -1, -1):
        end[t] = end[t + 1] if t + 1 < n and seq[t + 1] == seq[t] else t + 1
    for t in range(n):
        start[t] = start[t - 1] if t > 0 and seq[t - 1] == seq[t] else t

    # Near-future window score w_t.
    w = torch.zeros(n, dtype=torch.float64)
    for t in range(n):
        if valid[t]:
            num = den = 0.0
            for j in range(min(k, end[t] - t)):
                num += cfg.gamma ** j * m_list[t + j] * d_list[t + j]
                den += cfg.gamma ** j * m_list[t + j]
            w[t] = num / den

    # Thresholds and flags.
    thr_d = _threshold_value(cfg.loss_threshold, d_val, valid)
    thr_w = _threshold_value(cfg.div_threshold, w, valid)
    w_list = w.tolist()
    high = [m_list[t] > 0 and (thr_d is None or d_list[t] > thr_d) for t in range(n)]
    over = [thr_w is None or w_list[t] > thr_w for t in range(n)]
    divergent = [high[t] and over[t] for t in range(n)]

    # Weights: suppression, and guidance spread over the next k tokens.
    c = torch.zeros(n, dtype=torch.float64)
    for t in range(n):
        base = cfg.suppress_weight if (high[t] and not over[t]) else m_list[t]
        spread = sum(cfg.gamma ** j for j in range(min(k, t - start[t] + 1)) if divergent[t - j])
        c[t] = m_list[t] * (base + cfg.guidance_weight * spread)

    loss_tok = c.to(d.device) * d
    if cfg.reduction == "none":
        loss = loss_tok.reshape(rows.shape)
    elif cfg.reduction == "sum":
        loss = loss_tok.sum()
    elif cfg.reduction == "mean":
        loss = loss_tok.sum() / (float(cfg.num_items) if cfg.num_items is not None else max(float(m.sum()), 1.0))
    else:
        loss = loss_tok.sum() / (float(cfg.num_items) if cfg.num_items is not None else rows.num_seqs)
    if not return_stats:
        return loss
    dev = rows.student.device
    stats = WindowKLStats(
        kl=d_val.reshape(rows.shape).to(dev),
        window_score=w.reshape(rows.shape).to(dev),
        high_loss=torch.tensor(high, dtype=torch.bool).reshape(rows.shape).to(dev),
        divergent=torch.tensor(divergent, dtype=torch.bool).reshape(rows.shape).to(dev),
        weight=c.reshape(rows.shape).to(dev),
        entropy=entropy.reshape(rows.shape).to(dev),
    )
    return loss, stats
