"""Shared by the row-level tests (the Triton row kernels: test_triton_rows.py; the CUDA extension's backward:
test_cuda_host.py, test_gpu_cuda.py): random logits, the float64 truth of the row contract
(topd_kernels/rows/contract.py), the float32 error allowance for the row gradients, and gradients handed in
as strided rows of larger NaN-filled buffers (`grad_rows_in_buffer`: the contract's backward writes into
whatever rows the caller allocated).

Truth: d from the shared reference (`reference.token_divergence`), its gradient by autograd; the statistics
of contract.Stat in the same precision: MAX = max z (raw logits), LOGSUM = logsumexp((z - max z) / tau),
KL = d, MIX_S = KL(p_s || mix), MIX_T = KL(p_t || mix) (jsd; 0 otherwise).

Error model of a float32 row backward. Every gradient entry is g = coef / tau * p * F with p <= 1 and F a
difference of log-probabilities and d (contract.py). log p = (z - max z) / tau - logsum is formed in float32
from the float32 statistics of the contract, so it carries an absolute error of a few float32 ulps of the
size of the log-domain numbers of the row; cancellation in F makes this absolute error, not a relative one,
the right measure. That size is bounded by the row's log scale, the smaller of
    max(|z - max z| / tau, logsum)   (what the contract's formula forms), and
    max(|z / tau|, |max z / tau + logsum|)   (|log p| <= |z / tau| + |lse| bounds it as well),
and |d|, |MIX_*|, 1. Hence, per row,
    |error| <= ulp(out) * |g|  +  F32_LOG_ULPS * |coef| / tau * (that size)
(one rounding of the output dtype, plus the log-domain float32 error; `row_atol`, `assert_close`), and,
where g != 0, never below the output dtype's subnormal spacing ulp(out) * finfo(out).tiny (float16: 2**-24).
`stats_rounding_allowance` is the first-order, entry by entry, form of the same model.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from topd_kernels.reference import token_divergence
from topd_kernels.reference import student_entropy
from topd_kernels.rows.contract import NUM_STATS, Stat

NAN = float("nan")
INF = float("inf")

# One unit in the last place of each dtype (relative).
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
# float32 arithmetic on log-probabilities: a few float32 ulps of the largest log-domain number of the row.
F32_LOG_ULPS = 16 * ULP[torch.float32]


def rand_logits(n, v, *, pad=(0, 0), scale=3.0, correlation=0.8, garbage=(1e4, NAN), dtype=torch.float32,
                device="cpu", draw=torch.float64, offset=0.0):
    """Student / teacher logits (n, v + pad[0]), (n, v + pad[1]), drawn at `draw` precision on `device` and
    cast once to `dtype`. The teacher is correlated with the student (`correlation` 0.8: like a real
    teacher; 0: independent); `offset` is added to every logit of both (a large common offset such as 1e4
    must not cost accuracy); the padding columns (past v) hold `garbage`, which no kernel may read."""
    student = torch.randn(n, v + pad[0], dtype=draw, device=device) * scale
    teacher = torch.randn(n, v + pad[1], dtype=draw, device=device) * scale
    teacher[:, :v] = math.sqrt(1.0 - correlation ** 2) * teacher[:, :v] + correlation * student[:, :v]
    student[:, :v] += offset
    teacher[:, :v] += offset
    student[:, v:] = garbage[0]
    teacher[:, v:] = garbage[1]
    return student.to(dtype), teacher.to(dtype)


class GradRows(NamedTuple):
    """A gradient handed to a row backward as the rows of a larger NaN-filled buffer (`grad_rows_in_buffer`)."""

    rows: torch.Tensor      # (B, T, V) view of `buffer`: what the backward writes, every row in full
    buffer: torch.Tensor    # the whole allocation, NaN outside `rows`
    inside: torch.Tensor    # bool, buffer's shape: True exactly on the elements of `rows`

    def untouched_outside(self) -> bool:
        """Whether every element of the buffer outside the rows is still NaN (bitwise the fill: nothing wrote)."""
        return bool(self.buffer[~self.inside].isnan().all())


# How grad_rows_in_buffer lays the rows out in their buffer (all with unit last stride, rows disjoint):
GRAD_LAYOUTS = (
    "inner",       # buffer (B, T + 2, V + 3), rows buffer[:, 1:-1, :V]: both leading strides and an offset
    "causal",      # buffer (B, T + 1, V), rows buffer[:, :-1]: the gradient of logits[:, :-1] (functional.py)
    "transposed",  # buffer (T + 1, B, V + 2), rows buffer[1:, :, :V].transpose(0, 1): stride_b < stride_t
)


def grad_rows_in_buffer(shape, dtype, device, layout="inner") -> GradRows:
    """A (B, T, V) gradient that is a strided view of a larger NaN-filled buffer (GRAD_LAYOUTS)."""
    B, T, V = shape
    if layout == "inner":
        buffer = torch.full((B, T + 2, V + 3), NAN, dtype=dtype, device=device)
        cut = lambda x: x[:, 1:-1, :V]  # noqa: E731
    elif layout == "causal":
        buffer = torch.full((B, T + 1, V), NAN, dtype=dtype, device=device)
        cut = lambda x: x[:, :-1]  # noqa: E731
    elif layout == "transposed":
        buffer = torch.full((T + 1, B, V + 2), NAN, dtype=dtype, device=device)
        cut = lambda x: x[1:, :, :V].transpose(0, 1)  # noqa: E731
    else:
        raise ValueError(f"layout: one of {GRAD_LAYOUTS}, got {layout!r}")
    inside = torch.zeros(buffer.shape, dtype=torch.bool, device=device)
    cut(inside).fill_(True)
    rows = cut(buffer)
    assert rows.shape == (B, T, V) and (V <= 1 or rows.stride(-1) == 1)
    return GradRows(rows, buffer, inside)


class RowTruth(NamedTuple):
    stats: torch.Tensor                 # (NUM_STATS, N), rows contract.Stat; 0 on rows with coef == 0
    grad_student: torch.Tensor          # student's shape: coef * dd/dz_s, 0 past V and on rows with coef == 0
    grad_teacher: torch.Tensor | None   # the same for the teacher; None when not wanted


def truth(student, teacher, coef, V, tau, divergence, beta, *, want_teacher=True, dtype=torch.float64):
    """The row contract computed plainly at `dtype`: stats and the gradient of sum_t coef_t d_t.

    student, teacher: (N, V*) or (B, T, V*) (row i = (b, t) = divmod(i, T)); coef (N,); divergence by name.
    Rows with coef == 0 are not read (their logits may be non-finite): zero gradient, and all-zero stats
    (what the forward gives with mask = coef != 0).
    dtype=None: each input at its own dtype, as plain PyTorch would (the low-precision yardstick)."""
    shape_s, shape_t = student.shape, teacher.shape
    student, teacher = student.reshape(-1, shape_s[-1]), teacher.reshape(-1, shape_t[-1])
    n = student.shape[0]
    live = (coef != 0).nonzero().flatten()
    grad_s = torch.zeros(student.shape, dtype=dtype or student.dtype, device=student.device)
    grad_t = torch.zeros(teacher.shape, dtype=dtype or teacher.dtype, device=teacher.device)
    stats = torch.zeros((NUM_STATS, n), dtype=dtype or torch.float32, device=student.device)
    if live.numel():
        a_s = student[live, :V].detach().to(dtype or student.dtype).requires_grad_(True)
        a_t = teacher[live, :V].detach().to(dtype or teacher.dtype).requires_grad_(want_teacher)
        d = token_divergence(a_s, a_t, divergence, beta, tau, dtype=dtype)
        grads = torch.autograd.grad((d * coef[live].to(d.dtype)).sum(), [a_s, a_t] if want_teacher else [a_s])
        grad_s[live, :V] = grads[0]
        if want_teacher:
            grad_t[live, :V] = grads[1]
        with torch.no_grad():
            max_s, max_t = a_s.amax(-1), a_t.amax(-1)
            logsum_s = torch.logsumexp((a_s - max_s[:, None]) / tau, -1)
            logsum_t = torch.logsumexp((a_t - max_t[:, None]) / tau, -1)
            mix_s, mix_t = torch.zeros_like(d), torch.zeros_like(d)
            if divergence == "jsd":
                log_ps = (a_s - max_s[:, None]) / tau - logsum_s[:, None]
                log_pt = (a_t - max_t[:, None]) / tau - logsum_t[:, None]
                log_mix = torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
                ps, pt = log_ps.exp(), log_pt.exp()
                mix_s = torch.where(ps > 0, ps * (log_ps - log_mix), torch.zeros_like(ps)).sum(-1)
                mix_t = torch.where(pt > 0, pt * (log_pt - log_mix), torch.zeros_like(pt)).sum(-1)
            stats = stats.to(d.dtype)
            values = {Stat.MAX_S: max_s, Stat.LOGSUM_S: logsum_s, Stat.MAX_T: max_t, Stat.LOGSUM_T: logsum_t,
                      Stat.KL: d, Stat.MIX_S: mix_s, Stat.MIX_T: mix_t,
                      Stat.ENTROPY_S: student_entropy(a_s.detach(), tau, dtype=dtype)}  # TAIL_S: 0 (top-k rows only)
            for k, value in values.items():
                stats[k, live] = value.to(d.dtype)
    return RowTruth(stats, grad_s.reshape(shape_s), grad_t.reshape(shape_t) if want_teacher else None)


def row_atol(student, teacher, coef, stats, V, tau):
    """(N, 1) float64: the log-domain float32 error allowance of each row (module docstring), from the
    float32 statistics `stats` (contract.Stat rows) that the backward was handed. student, teacher: (N, V*)."""
    def finite(x):   # the first V columns; non-finite entries (p = 0, or rows not read) left out
        x = x[:, :V]
        return x, torch.isfinite(x)

    def extremes(x):  # (max |z|, min z) over the finite entries, in x's own dtype (exact): no float64 copy
        x, fin = finite(x)
        if V == 0:
            zero = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            return zero, zero, torch.zeros_like(zero, dtype=torch.bool)
        absmax = torch.where(fin, x.abs(), 0).amax(dim=1).double()
        low = torch.where(fin, x, torch.finfo(x.dtype).max).amin(dim=1).double()
        return absmax, low, fin.any(dim=1)

    st = stats.double().nan_to_num(0.0)
    ones = torch.ones(student.shape[0], dtype=torch.float64, device=student.device)
    scales_new, scales_old = [], []
    for x, k_max, k_logsum in ((student, Stat.MAX_S, Stat.LOGSUM_S), (teacher, Stat.MAX_T, Stat.LOGSUM_T)):
        absmax, low, any_finite = extremes(x)
        spread = torch.where(any_finite, st[k_max] - low, 0.0).abs()  # max |z - max z|
        scales_new += [spread / tau, st[k_logsum].abs()]
        scales_old += [absmax / tau, (st[k_max] / tau + st[k_logsum]).abs()]
    log_scale = torch.minimum(torch.stack(scales_new).amax(dim=0), torch.stack(scales_old).amax(dim=0))
    mag = torch.stack([log_scale, st[Stat.KL].abs(), st[Stat.MIX_S].abs(), st[Stat.MIX_T].abs(), ones]).amax(dim=0)
    mag = mag.nan_to_num(0.0, posinf=torch.finfo(torch.float64).max)
    atol = F32_LOG_ULPS * coef.double().abs() / tau * mag
    return torch.where(coef != 0, atol, 0.0)[:, None]


def assert_close(got, want, name, atol_row):
    """got within one output ulp of the float64 `want` plus the row's float32 allowance, everywhere."""
    assert got.shape == want.shape
    got64 = got.double()
    assert torch.isfinite(want).all(), f"{name}: the truth itself is not finite"
    assert torch.isfinite(got64).all(), f"{name}: unwritten (NaN) or non-finite entries in the output"
    tol = ULP[got.dtype] * want.abs() + atol_row
    # one unit of the output dtype at a nonzero true value: relative in the normal range, the subnormal
    # spacing below it (float16 rounds a true 2.9e-8 to 0), where the float32 error is negligible beside it.
    # A true 0 (masked row, padding, p == 0) has no such allowance.
    subnormal_ulp = ULP[got.dtype] * torch.finfo(got.dtype).tiny
    tol = torch.where(want != 0, tol.clamp_min(subnormal_ulp), tol) + 1e-30
    err = (got64 - want).abs()
    bad = err > tol
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} entries off, e.g. [{i[0]}, {i[1]}] got {got64[i[0], i[1]].item():.9g} "
            f"want {want[i[0], i[1]].item():.9g} (tol {tol[i[0], i[1]].item():.3g}); "
            f"max err / tol = {float((err / tol).max()):.3g}"
        )


def stats_rounding_allowance(z_s, z_t, true_stats, coef, tau, beta, true_g, weight=1.0):
    """First-order gradient error, entry by entry, from evaluating log p = (z - max z) / tau - logsum in
    float32 with the float32 statistics of the row contract: log p carries a rounding of about
    eps * (|z - max z| / tau + logsum + |log p|), so each entry g = weight * coef / tau * p * F
    (F = log p_s - log p_t - d or alike; weight 1, or jsd's 1 - beta (student) / beta (teacher)) errs by up to
        weight * coef / tau * (p_s + p_t) * dF  +  |g| * d(log p),
        dF = d(log p_s) + d(log p_t) + eps * |d, K_s, K_t|.
    (JSD's K_t is a statistic of its own: no 1 / beta.) z_s, z_t: the first V columns, float64, (N, V);
    true_stats (NUM_STATS, N); beta is unused, kept for the callers; (N, V) out, 0 on rows with coef == 0."""
    eps = 2.0 ** -24
    st = {k: true_stats[k][:, None] for k in Stat}

    def finite_abs(x):  # entries at -inf have p = 0: nothing to allow there
        return torch.nan_to_num(x.abs(), posinf=0.0)

    shift_s, shift_t = (z_s - st[Stat.MAX_S]) / tau, (z_t - st[Stat.MAX_T]) / tau
    log_ps, log_pt = shift_s - st[Stat.LOGSUM_S], shift_t - st[Stat.LOGSUM_T]
    d_log_ps = eps * (finite_abs(shift_s) + st[Stat.LOGSUM_S].abs() + finite_abs(log_ps))
    d_log_pt = eps * (finite_abs(shift_t) + st[Stat.LOGSUM_T].abs() + finite_abs(log_pt))
    d_F = d_log_ps + d_log_pt + eps * (st[Stat.KL].abs() + st[Stat.MIX_S].abs() + st[Stat.MIX_T].abs())
    p_sum = log_ps.exp() + log_pt.exp()
    allowance = (weight * coef.double().abs()[:, None] / tau * p_sum * d_F
                 + true_g.abs() * torch.maximum(d_log_ps, d_log_pt))
    return torch.where((coef != 0)[:, None], allowance, 0.0)  # rows with coef == 0 are not read (may be NaN)
