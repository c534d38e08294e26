"""Which code computes the per-row work: the row-backend contract and backend selection.

The loss splits into per-row work over the vocabulary (the expensive part, one row = one token position)
and per-token work over the sequence (the window step, cheap, shared by every backend: `window.py`).
A *row backend* implements the per-row work as two functions with these exact signatures:

    row_forward(student, teacher, vocab_size, temperature, divergence, beta) -> stats
        student (N, Vs), teacher (N, Vt): float32 / bfloat16 / float16, last dim contiguous (stride 1),
        any row stride. Only the first `vocab_size` columns are read.
        stats: float32 (4, N), rows:
            0  lse_s  logsumexp(student[:, :V] / tau)
            1  lse_t  logsumexp(teacher[:, :V] / tau)
            2  d      the per-row divergence in nats (SPEC "Per-token divergence"; not masked here)
            3  aux    jsd: KL(p_s || mix); other divergences: 0.
                      The teacher's JSD term is then KL(p_t || mix) = (d - (1 - beta) aux) / beta.

    row_backward(student, teacher, stats, coef, vocab_size, temperature, divergence, beta,
                 grad_student, grad_teacher) -> None
        coef: float32 (N,), the per-row multiplier c_t * (upstream gradient) * (1 / denominator).
        grad_student: preallocated, shape and dtype of `student`; written in full:
            grad_student[:, :V] = coef * dd/dz_s,   grad_student[:, V:] = 0.
        grad_teacher: same for the teacher, or None when the teacher needs no gradient.
        Rows with coef == 0 are written as exact zeros even when their logits are not finite.

With a = z / tau, log p = a - lse and dd/dz = (1 / tau) dd/da, the row gradients are
    reverse_kl  dd/da_s = p_s (log p_s - log p_t - d)          dd/da_t = p_t - p_s
    forward_kl  dd/da_s = p_s - p_t                            dd/da_t = p_t (log p_t - log p_s - d)
    jsd         dd/da_s = (1-beta) p_s (log p_s - log m - K_s)  dd/da_t = beta p_t (log p_t - log m - K_t)
                with m = (1-beta) p_s + beta p_t, K_s = KL(p_s||m) = aux, K_t = KL(p_t||m);
and every term p * (...) with p == 0 is 0 (entries at -inf contribute nothing).

Backends (`backend=` of `fused_window_kl`):
    "torch"        chunked PyTorch forward and backward (`torch_rows.py`); any device.
    "triton"       Triton forward and Triton backward (`triton_rows.py`); CUDA tensors, or CPU tensors
                   under TRITON_INTERPRET=1.
    "triton+cuda"  Triton forward, CUDA-extension backward (`cuda_rows.py`); CUDA tensors, extension built.
    "auto"         CUDA tensors: "triton+cuda" when the extension is built, else "triton" when triton
                   imports, else "torch". Any other device: "torch".
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

from . import torch_rows

BACKENDS = ("auto", "torch", "triton", "triton+cuda")


class RowBackend(NamedTuple):
    """The pair of row functions that one `backend=` name resolves to."""

    name: str
    row_forward: Callable
    row_backward: Callable


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> tuple[bool, str]:
    """(usable, reason): whether the Triton row kernels import here."""
    try:
        from . import triton_rows  # noqa: F401  (imports triton: kept out of the package import)
    except Exception as exc:  # ImportError, or triton failing to initialise
        return False, f"triton unavailable: {type(exc).__name__}: {exc}"
    return True, "ok"


def cuda_extension_available() -> tuple[bool, str]:
    """(built, reason): whether the CUDA backward extension is importable."""
    try:
        from . import cuda_rows
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return cuda_rows.extension_status()


def resolve(backend: str, device: torch.device) -> RowBackend:
    """Map a `backend=` name and the tensors' device to row functions, or raise ValueError.

    Never falls back silently: a named backend that cannot run on `device` is an error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if not on_cuda:
            backend = "torch"
        elif cuda_extension_available()[0] and triton_available()[0]:
            backend = "triton+cuda"
        elif triton_available()[0]:
            backend = "triton"
        else:
            backend = "torch"
    if backend == "torch":
        return RowBackend("torch", torch_rows.row_forward, torch_rows.row_backward)

    if not (on_cuda or (device.type == "cpu" and _interpreting())):
        raise ValueError(
            f"backend: {backend!r} needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"import); got tensors on {device}. Use backend='torch' or 'auto'."
        )
    ok, why = triton_available()
    if not ok:
        raise ValueError(f"backend: {backend!r} is not available here ({why})")
    from . import triton_rows

    if backend == "triton":
        return RowBackend("triton", triton_rows.row_forward, triton_rows.row_backward)

    built, why = cuda_extension_available()
    if not built:
        raise ValueError(f"backend: 'triton+cuda' needs the CUDA extension, which is not built ({why})")
    if not on_cuda:
        raise ValueError("backend: 'triton+cuda' runs the CUDA extension, which needs CUDA tensors")
    from . import cuda_rows

    return RowBackend("triton+cuda", triton_rows.row_forward, cuda_rows.row_backward)
