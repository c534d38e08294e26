"""The CUDA-extension row backend: only a backward (the "triton+cuda" backend pairs it with the Triton forward).

Implements the `row_backward` half of the row contract (`contract.py`). The compiled module
`topd_kernels._cuda_backward` (csrc/, built by setup.py with nvcc when available) takes one
`BackwardCall`: raw addresses, sizes and element strides as integers, filled here from the tensors and
the RowCall (`_call_fields`, the one place on the Python side that names them). The gradients are the
caller's: written in place through their own strides (any non-overlapping rows, such as the rows of a
longer tensor's gradient), checked here before their addresses go to C++.

    OPS            define_row_ops("cuda", None, row_backward): the op `topd::cuda_row_backward`
    UNAVAILABLE    None when the extension imports, else why not (the registry reads it)
    row_backward   the contract's (mutating) backward; CUDA tensors: the kernel on the current stream of their
                   device; CPU tensors: the extension's host build of the same __host__ __device__ code
                   (how the CPU CI checks the CUDA arithmetic, and what stands where the kernel stands on
                   a GPU when the Triton forward runs in the interpreter)
    run_backward   row_backward with the kernel's work split exposed (chunk_cols, emulated_threads): tests
    EXTENSION      the compiled module, or None
    build_info()   "archs ...; nvcc ..." of the built extension; extension_status() -> (built, reason)

Importing this module never fails when the extension is missing.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from ..config import DIVERGENCE_CODES
from .contract import NUM_STATS, RowCall, Stat, check_gradient, define_row_ops, make_row_call

_MODULE_NAME = "topd_kernels._cuda_backward"


def _import_extension():
    """(the compiled module, None) or (None, why it is not there or not usable)."""
    try:
        ext = importlib.import_module(_MODULE_NAME)
        # A stale build (another layout of the call or of the statistics) must not run.
        if getattr(ext, "stat_rows", None) != {s.name: int(s) for s in Stat} or \
                getattr(ext, "divergence_codes", None) != DIVERGENCE_CODES:
            return None, (f"{_MODULE_NAME} is stale (its statistics rows or divergence codes differ from "
                          "contract.Stat / config.DIVERGENCE_CODES): reinstall with TOPD_CUDA_BUILD=1")
        return ext, None
    except ModuleNotFoundError as exc:
        if exc.name == _MODULE_NAME:
            return None, (f"{_MODULE_NAME} is not installed (the package was installed with TOPD_CUDA_BUILD=0, "
                          "without nvcc, or its nvcc build failed; reinstall with TOPD_CUDA_BUILD=1 to see why)")
        return None, f"{_MODULE_NAME} failed to import: {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - ImportError (e.g. undefined symbol), OSError
        return None, f"{_MODULE_NAME} failed to import: {type(exc).__name__}: {exc}"


EXTENSION, UNAVAILABLE = _import_extension()
_DTYPE_CODES = {} if EXTENSION is None else {getattr(torch, name): code for name, code in EXTENSION.dtype_codes.items()}


def build_info() -> str:
    """The compiled architectures and the nvcc version of the extension (it must be built)."""
    return f"archs {_require().archs}; nvcc {EXTENSION.nvcc_version}"


def extension_status() -> tuple[bool, str]:
    """(built, reason). Built: the reason is build_info()."""
    return (False, str(UNAVAILABLE)) if EXTENSION is None else (True, build_info())


def _require():
    if EXTENSION is None:
        raise RuntimeError(f"topd_kernels CUDA extension not available: {UNAVAILABLE}")
    return EXTENSION


def _check_rows(name: str, x: Tensor, student: Tensor, shape: tuple) -> None:
    """stats / coef: what make_row_call does not see and the extension must trust (extents, dtype)."""
    if x.dtype != torch.float32 or tuple(x.shape) != shape or x.device != student.device:
        raise ValueError(f"{name}: expected float32 {shape} on {student.device}, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")


def _call_fields(student, teacher, stats, coef, grad_student, grad_teacher, call: RowCall, chunk_cols: int) -> dict:
    """Every field of the extension's BackwardCall (csrc/row_backward.h), from the tensors and the call;
    grad_teacher None: address 0 (not wanted), strides 0."""
    want_teacher = grad_teacher is not None
    return dict(
        student=student.data_ptr(), teacher=teacher.data_ptr(), stats=stats.data_ptr(), coef=coef.data_ptr(),
        grad_student=grad_student.data_ptr(), grad_teacher=grad_teacher.data_ptr() if want_teacher else 0,
        student_dtype=_DTYPE_CODES[student.dtype], teacher_dtype=_DTYPE_CODES[teacher.dtype],
        batch=student.shape[0], length=student.shape[1], s_width=student.shape[2], t_width=teacher.shape[2],
        s_stride_b=student.stride(0), s_stride_t=student.stride(1),
        t_stride_b=teacher.stride(0), t_stride_t=teacher.stride(1),
        gs_stride_b=grad_student.stride(0), gs_stride_t=grad_student.stride(1),
        gt_stride_b=grad_teacher.stride(0) if want_teacher else 0,
        gt_stride_t=grad_teacher.stride(1) if want_teacher else 0,
        stats_s0=stats.stride(0), stats_s1=stats.stride(1), coef_s0=coef.stride(0),
        vocab_size=call.vocab_size, temperature=call.temperature, divergence=call.divergence, beta=call.beta,
        chunk_cols=int(chunk_cols),
    )


def run_backward(student: Tensor, teacher: Tensor, stats: Tensor, coef: Tensor, call: RowCall,
                 grad_student: Tensor, grad_teacher: Optional[Tensor], *, chunk_cols: int = 0,
                 emulated_threads: int = 1) -> None:
    """`row_backward`, with the kernel's work split: chunk_cols (a multiple of 8; 0 = the launcher's
    choice, on the host the whole row) columns per work item, emulated_threads cooperating threads per
    work item (host build only)."""
    ext = _require()
    # The extension trusts sizes and strides to describe the memory behind the addresses: the row tensors
    # are checked by the contract's one check, stats, coef and the gradients here; the scalars again (and
    # the gradients' rows for overlap) by the C++ validate.
    call = make_row_call(student, teacher, *call)
    n = student.shape[0] * student.shape[1]
    _check_rows("stats", stats, student, (NUM_STATS, n))
    _check_rows("coef", coef, student, (n,))
    check_gradient("grad_student", grad_student, student)  # again: tests call this without the op
    if grad_teacher is not None:
        check_gradient("grad_teacher", grad_teacher, teacher)
    device = student.device
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"student: the CUDA extension runs on cuda (or, host build, cpu) tensors, not {device}")
    if device.type == "cuda" and emulated_threads != 1:
        raise ValueError("emulated_threads: only the host build emulates threads")
    backward_call = ext.BackwardCall()
    for field, value in _call_fields(student, teacher, stats, coef, grad_student, grad_teacher, call,
                                     chunk_cols).items():
        setattr(backward_call, field, value)
    if device.type == "cuda":
        ext.row_backward_cuda(backward_call, torch.cuda.current_stream(device).cuda_stream, device.index)
    else:
        ext.row_backward_host(backward_call, int(emulated_threads))


def _call_layout_differs(ext) -> bool:
    """Whether the built BackwardCall's fields differ from those `_call_fields` fills (a build from before a
    change of the call: a field it lacks would fail at the first call, a field Python does not fill would
    silently keep its default)."""
    probe = torch.zeros(1, 1, 1)
    try:
        fields = _call_fields(probe, probe, torch.zeros(NUM_STATS, 1), torch.zeros(1), probe, probe,
                              RowCall(1, 1.0, 0, 0.5), 0)
    except KeyError:   # no dtype code for float32
        return True
    return tuple(fields) != tuple(getattr(ext, "call_fields", ()))


if EXTENSION is not None and _call_layout_differs(EXTENSION):
    EXTENSION, _DTYPE_CODES = None, {}
    UNAVAILABLE = (f"{_MODULE_NAME} is stale (its BackwardCall fields differ from those cuda_rows._call_fields "
                   "fills): reinstall with TOPD_CUDA_BUILD=1")


def row_backward(student: Tensor, teacher: Tensor, stats: Tensor, coef: Tensor, call: RowCall,
                 grad_student: Tensor, grad_teacher: Optional[Tensor]) -> None:
    """Write coef * dd/dz per the contract into grad_student (B, T, Vs) and grad_teacher (B, T, Vt) unless
    None: every row in full (zeros past vocab_size, exact zeros on rows with coef == 0), in place, whatever
    their (non-overlapping) strides on the first two dims; nothing outside their rows is touched."""
    run_backward(student, teacher, stats, coef, call, grad_student, grad_teacher)


OPS = define_row_ops("cuda", None, row_backward)
