"""Shared by the row-level tests (the Triton row kernels: test_triton_rows.py; the CUDA extension's backward:
test_cuda_host.py, test_gpu_cuda.py): random logits, the float64 truth of the row contract
(topd_kernels/backends.py), and the float32 error allowance for the row gradients.

Truth: d from the shared reference (`reference.token_divergence`), its gradient by autograd; lse by
logsumexp, aux = KL(p_s || mix) (jsd), in the same precision.

Error model of a float32 row backward. Every gradient entry is g = coef / tau * p * F with p <= 1 and F a
difference of log-probabilities and d (backends.py). log p = z / tau - lse is formed in float32 from the
float32 statistics of the contract, so it carries an absolute error of a few float32 ulps of the size of
the log-domain numbers of the row (|z / tau|, |lse|, |d|); cancellation in F makes this absolute error, not
a relative one, the right measure. Hence, per row,
    |error| <= ulp(out) * |g|  +  F32_LOG_ULPS * |coef| / tau * max(1, |z_s / tau|, |z_t / tau|, |lse|, |d|)
(one rounding of the output dtype, plus the log-domain float32 error; `row_atol`, `assert_close`), and,
where g != 0, never below the output dtype's subnormal spacing ulp(out) * finfo(out).tiny (float16: 2**-24).
`stats_rounding_allowance` is the first-order, entry by entry, form of the same model.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from topd_kernels.reference import token_divergence

NAN = float("nan")
INF = float("inf")

# One unit in the last place of each dtype (relative).
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
# float32 arithmetic on log-probabilities: a few float32 ulps of the largest log-domain number of the row.
F32_LOG_ULPS = 16 * ULP[torch.float32]


def rand_logits(n, v, *, pad=(0, 0), scale=3.0, correlation=0.8, garbage=(1e4, NAN), dtype=torch.float32,
                device="cpu", draw=torch.float64):
    """Student / teacher logits (n, v + pad[0]), (n, v + pad[1]), drawn at `draw` precision on `device` and
    cast once to `dtype`. The teacher is correlated with the student (`correlation` 0.8: like a real
    teacher; 0: independent); the padding columns (past v) hold `garbage`, which no kernel may read."""
    student = torch.randn(n, v + pad[0], dtype=draw, device=device) * scale
    teacher = torch.randn(n, v + pad[1], dtype=draw, device=device) * scale
    teacher[:, :v] = math.sqrt(1.0 - correlation ** 2) * teacher[:, :v] + correlation * student[:, :v]
    student[:, v:] = garbage[0]
    teacher[:, v:] = garbage[1]
    return student.to(dtype), teacher.to(dtype)


class RowTruth(NamedTuple):
    stats: torch.Tensor                 # (4, N): lse_s, lse_t, d, aux; NaN on rows with coef == 0
    grad_student: torch.Tensor          # student's shape: coef * dd/dz_s, 0 past V and on rows with coef == 0
    grad_teacher: torch.Tensor | None   # the same for the teacher; None when not wanted


def truth(student, teacher, coef, V, tau, divergence, beta, *, want_teacher=True, dtype=torch.float64):
    """The row contract computed plainly at `dtype`: stats and the gradient of sum_t coef_t d_t.

    Rows with coef == 0 are not read (their logits may be non-finite): zero gradient, NaN stats.
    dtype=None: each input at its own dtype, as plain PyTorch would (the low-precision yardstick)."""
    n = student.shape[0]
    live = (coef != 0).nonzero().flatten()
    grad_s = torch.zeros(student.shape, dtype=dtype or student.dtype, device=student.device)
    grad_t = torch.zeros(teacher.shape, dtype=dtype or teacher.dtype, device=teacher.device)
    stats = torch.full((4, n), NAN, dtype=dtype or torch.float32, device=student.device)
    if live.numel():
        a_s = student[live, :V].detach().to(dtype or student.dtype).requires_grad_(True)
        a_t = teacher[live, :V].detach().to(dtype or teacher.dtype).requires_grad_(want_teacher)
        d = token_divergence(a_s, a_t, divergence, beta, tau, dtype=dtype)
        grads = torch.autograd.grad((d * coef[live].to(d.dtype)).sum(), [a_s, a_t] if want_teacher else [a_s])
        grad_s[live, :V] = grads[0]
        if want_teacher:
            grad_t[live, :V] = grads[1]
        with torch.no_grad():
            lse_s = torch.logsumexp(a_s / tau, -1)
            lse_t = torch.logsumexp(a_t / tau, -1)
            aux = torch.zeros_like(d)
            if divergence == "jsd":
                log_ps, log_pt = a_s / tau - lse_s[:, None], a_t / tau - lse_t[:, None]
                log_mix = torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
                ps = log_ps.exp()
                aux = torch.where(ps > 0, ps * (log_ps - log_mix), torch.zeros_like(ps)).sum(-1)
            stats = stats.to(d.dtype)
            stats[:, live] = torch.stack([lse_s, lse_t, d, aux]).to(d.dtype)
    return RowTruth(stats, grad_s, grad_t if want_teacher else None)


def row_atol(student, teacher, coef, stats, V, tau):
    """(N, 1) float64: the log-domain float32 error allowance of each row (module docstring), from the
    float32 statistics `stats` that the backward was handed."""
    def finite_absmax(x):   # in x's own dtype (exact for a max): no float64 copy of big inputs
        if V == 0:
            return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        x = x[:, :V]
        return torch.where(torch.isfinite(x), x.abs(), 0).amax(dim=1).double() / tau
    ones = torch.ones(student.shape[0], dtype=torch.float64, device=student.device)
    mag = torch.stack([finite_absmax(student), finite_absmax(teacher),
                       *stats[:3].double().nan_to_num(0.0).abs(), ones]).amax(dim=0)
    return (F32_LOG_ULPS * coef.double().abs() / tau * mag)[:, None]


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


def stats_rounding_allowance(z_s, z_t, true_stats, coef, tau, beta, true_g):
    """First-order gradient error, entry by entry, from evaluating log p = z / tau - lse in float32 with the
    float32 statistics of the row contract: log p carries a rounding of about eps * (|a| + |lse| + |log p|),
    so each entry g = coef / tau * p * F (F = log p_s - log p_t - d or alike) errs by up to
        coef / tau * (p_s + p_t) * dF  +  |g| * d(log p),    dF = d(log p_s) + d(log p_t) + eps * |stats|.
    z_s, z_t: the first V columns, float64; (N, V) out."""
    eps = 2.0 ** -24
    lse_s, lse_t, d, aux = (x[:, None] for x in true_stats)

    def finite_abs(x):  # entries at -inf have p = 0: nothing to allow there
        return torch.nan_to_num(x.abs(), posinf=0.0)

    a_s, a_t = z_s / tau, z_t / tau
    log_ps, log_pt = a_s - lse_s, a_t - lse_t
    d_log_ps = eps * (finite_abs(a_s) + lse_s.abs() + finite_abs(log_ps))
    d_log_pt = eps * (finite_abs(a_t) + lse_t.abs() + finite_abs(log_pt))
    d_F = d_log_ps + d_log_pt + eps * (d.abs() + aux.abs()) / beta
    p_sum = log_ps.exp() + log_pt.exp()
    return coef.double().abs()[:, None] / tau * p_sum * d_F + true_g.abs() * torch.maximum(d_log_ps, d_log_pt)
