"""Shared by the CUDA-extension tests (host build and GPU): inputs with chosen layouts, float64 truth
from the lead's reference, and the float32 + output-rounding tolerance."""
from __future__ import annotations

import os
import shutil

import torch

from topd_kernels.reference import token_divergence

NAN = float("nan")
INF = float("inf")


def nvcc_path() -> str | None:
    """The nvcc that setup.py would use (same lookup order)."""
    explicit = os.environ.get("TOPD_NVCC")
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def extension_skip_reason() -> str | None:
    if os.environ.get("TOPD_CUDA_BUILD", "auto").strip().lower() in ("0", "off", "false", "no", "skip"):
        return "TOPD_CUDA_BUILD=0: the CUDA extension is deliberately not built"
    if nvcc_path() is None:
        return "nvcc absent: the CUDA extension cannot have been built"
    return None


def logits(n, width, dtype, *, offset=0, row_stride=None, scale=3.0, base=None, device="cpu"):
    """(n, width) logits in `dtype`, as a view with the given element offset and row stride."""
    row_stride = row_stride or width
    buf = torch.full((offset + n * row_stride + width,), NAN, dtype=dtype, device=device)
    view = buf.as_strided((n, width), (row_stride, 1), offset)
    vals = torch.randn(n, width, device=device) * scale if base is None else base
    view.copy_(vals.to(dtype))
    return view


def like(x, *, offset=0, row_stride=None):
    """A NaN-filled output with x's shape and dtype, with its own offset and row stride."""
    n, width = x.shape
    row_stride = row_stride or width
    buf = torch.full((offset + n * row_stride + width,), NAN, dtype=x.dtype, device=x.device)
    return buf.as_strided((n, width), (row_stride, 1), offset)


def truth(student, teacher, coef, V, tau, divergence, beta, want_teacher):
    """float64 grad of sum_t coef_t d_t (rows with coef == 0: zero, their logits never touched)."""
    gs = torch.zeros(student.shape, dtype=torch.float64, device=student.device)
    gt = torch.zeros(teacher.shape, dtype=torch.float64, device=teacher.device)
    live = (coef != 0).nonzero().flatten()
    if live.numel():
        s = student[live, :V].double().requires_grad_(True)
        t = teacher[live, :V].double().requires_grad_(want_teacher)
        d = token_divergence(s, t, divergence, beta, tau)
        (d * coef[live].double()).sum().backward()
        gs[live, :V] = s.grad
        if want_teacher:
            gt[live, :V] = t.grad
    return gs, (gt if want_teacher else None)


# One unit in the last place of the output dtype (relative) ...
OUT_REL = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
# ... plus float32 arithmetic on log-probabilities: log p = z / tau - lse carries an absolute error of a
# few float32 ulps of max(|z / tau|, |lse|, |d|), times coef / tau (p <= 1). Cancellation in
# (log p_s - log p_t - d) makes this, not a relative error, the right bound.
F32_LOG_ULPS = 16 * 2.0 ** -23


def row_atol(student, teacher, coef, stats, V, tau):
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
    assert got.shape == want.shape
    got64 = got.double()
    assert not torch.isnan(got64).any(), f"{name}: NaN in the output"
    tol = OUT_REL[got.dtype] * want.abs() + atol_row + 1e-30
    err = (got64 - want).abs()
    bad = err > tol
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} entries off, e.g. [{i[0]}, {i[1]}] got {got64[i[0], i[1]].item():.9g} "
            f"want {want[i[0], i[1]].item():.9g} (tol {tol[i[0], i[1]].item():.3g}); "
            f"max err / tol = {float((err / tol).max()):.3g}"
        )
