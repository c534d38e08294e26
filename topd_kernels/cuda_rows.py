"""CUDA-extension row backward (the `row_backward` half of the row-backend contract in `backends.py`).

The compiled module `topd_kernels._cuda_backward` (csrc/, built by setup.py with nvcc when available) takes
raw addresses, sizes, strides and the CUDA stream as integers; this file turns tensors into those
integers, checks them, and exposes:

    extension_status() -> (built, reason)
    row_backward(...)       the contract's signature, CUDA tensors: launches on the current stream
    row_backward_host(...)  the same signature, CPU tensors: runs the same __host__ __device__ code on
                            the host (how the CPU CI checks the CUDA code's arithmetic)

Importing this module never fails when the extension is missing; the extension is imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DIVERGENCE_CODES = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}

_MODULE_NAME = "topd_kernels._cuda_backward"
_ext = None
_ext_error: Optional[str] = None


def _load():
    """The compiled module, or None (the reason is kept in _ext_error)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module(_MODULE_NAME)
        except ModuleNotFoundError as exc:
            if exc.name == _MODULE_NAME:
                _ext_error = (
                    f"{_MODULE_NAME} is not installed (the package was installed with TOPD_CUDA_BUILD=0, "
                    "without nvcc, or its nvcc build failed; reinstall with TOPD_CUDA_BUILD=1 to see why)"
                )
            else:
                _ext_error = f"{_MODULE_NAME} failed to import: {type(exc).__name__}: {exc}"
        except Exception as exc:  # ImportError (e.g. undefined symbol), OSError
            _ext_error = f"{_MODULE_NAME} failed to import: {type(exc).__name__}: {exc}"
    return _ext


def extension_status() -> tuple[bool, str]:
    """(built, reason). Built: the reason names the compiled architectures and the nvcc version."""
    ext = _load()
    if ext is None:
        return False, str(_ext_error)
    return True, f"archs {ext.archs}; nvcc {ext.nvcc_version}"


def _require():
    ext = _load()
    if ext is None:
        raise RuntimeError(f"topd_kernels CUDA extension not available: {_ext_error}")
    return ext


def _check_matrix(name: str, t: torch.Tensor, rows: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (float32, bfloat16 or float16)")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (N, V) tensor, got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows, got {t.shape[0]}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {t.stride()}")


def _call_kwargs(student, teacher, stats, coef, vocab_size, temperature, divergence, beta,
                 grad_student, grad_teacher, device_type: str) -> dict:
    _check_matrix("student", student)
    n = student.shape[0]
    _check_matrix("teacher", teacher, n)
    for name, t in (("teacher", teacher), ("stats", stats), ("coef", coef), ("grad_student", grad_student)) + (
        (("grad_teacher", grad_teacher),) if grad_teacher is not None else ()
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.device != student.device:
            raise ValueError(f"{name}: on {t.device}, student on {student.device}")
    if student.device.type != device_type:
        raise ValueError(f"student: expected {device_type} tensors, got {student.device}")
    if stats.dtype != torch.float32 or tuple(stats.shape) != (4, n):
        raise ValueError(f"stats: expected float32 (4, {n}), got {stats.dtype} {tuple(stats.shape)}")
    if coef.dtype != torch.float32 or tuple(coef.shape) != (n,):
        raise ValueError(f"coef: expected float32 ({n},), got {coef.dtype} {tuple(coef.shape)}")
    if grad_student.shape != student.shape or grad_student.dtype != student.dtype:
        raise ValueError("grad_student: must have the shape and dtype of student")
    _check_matrix("grad_student", grad_student, n)
    if grad_teacher is not None:
        if grad_teacher.shape != teacher.shape or grad_teacher.dtype != teacher.dtype:
            raise ValueError("grad_teacher: must have the shape and dtype of teacher")
        _check_matrix("grad_teacher", grad_teacher, n)
    if divergence not in _DIVERGENCE_CODES:
        raise ValueError(f"divergence: unknown {divergence!r}; expected one of {tuple(_DIVERGENCE_CODES)}")
    v = int(vocab_size)
    if not 0 <= v <= min(student.shape[1], teacher.shape[1]):
        raise ValueError(f"vocab_size: {v} outside [0, min({student.shape[1]}, {teacher.shape[1]})]")
    if not float(temperature) > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if divergence == "jsd" and not 0.0 < float(beta) < 1.0:
        raise ValueError(f"beta: must be in (0, 1) for jsd, got {beta}")
    gt = grad_teacher
    return dict(
        student=student.data_ptr(), teacher=teacher.data_ptr(), stats=stats.data_ptr(), coef=coef.data_ptr(),
        grad_student=grad_student.data_ptr(), grad_teacher=0 if gt is None else gt.data_ptr(),
        student_dtype=_DTYPE_CODES[student.dtype], teacher_dtype=_DTYPE_CODES[teacher.dtype],
        n_rows=n, vocab_size=v, s_width=student.shape[1], t_width=teacher.shape[1],
        s_stride=student.stride(0), t_stride=teacher.stride(0), gs_stride=grad_student.stride(0),
        gt_stride=0 if gt is None else gt.stride(0),
        stats_s0=stats.stride(0), stats_s1=stats.stride(1), coef_s0=coef.stride(0),
        temperature=float(temperature), divergence=_DIVERGENCE_CODES[divergence],
        beta=float(beta) if beta is not None else 0.5,
    )


def row_backward(student, teacher, stats, coef, vocab_size, temperature, divergence, beta,
                 grad_student, grad_teacher, *, chunk_cols: int = 0) -> None:
    """The contract's row_backward on CUDA tensors, on the current stream of student's device."""
    ext = _require()
    kw = _call_kwargs(student, teacher, stats, coef, vocab_size, temperature, divergence, beta,
                      grad_student, grad_teacher, "cuda")
    if kw["n_rows"] == 0:
        return
    stream = torch.cuda.current_stream(student.device).cuda_stream
    ext.row_backward_cuda(**kw, stream=stream, device=student.device.index, chunk_cols=int(chunk_cols))


def row_backward_host(student, teacher, stats, coef, vocab_size, temperature, divergence, beta,
                      grad_student, grad_teacher, *, chunk_cols: int = 0, emulated_threads: int = 1) -> None:
    """The same computation on CPU tensors, through the extension's host build of the CUDA code.

    chunk_cols (a multiple of 8; 0 = whole row) and emulated_threads mimic the kernel's work split.
    """
    ext = _require()
    kw = _call_kwargs(student, teacher, stats, coef, vocab_size, temperature, divergence, beta,
                      grad_student, grad_teacher, "cpu")
    ext.row_backward_host(**kw, chunk_cols=int(chunk_cols), emulated_threads=int(emulated_threads))
