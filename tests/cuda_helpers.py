"""Shared by the CUDA-extension tests (host build, generated code, GPU): whether the extension can have been
built, row tensors and gradients with chosen memory layouts, and the run-and-check of one backward call.
The random logits, the float64 truth and the float32 + output-rounding tolerance are those of all the row
tests: row_cases.py; the saved statistics come from the torch backend's forward (`torch_rows.row_forward`,
the contract's statistics in float32, as in the real pipeline). The backward writes into gradients the
caller allocates (the row contract): here fresh NaN-filled ones, or strided rows of larger NaN-filled
buffers (GRAD_LAYOUTS, `grad_in_buffer`)."""
from __future__ import annotations

import os
import shutil

import torch

from row_cases import GRAD_LAYOUTS as SHARED_GRAD_LAYOUTS
from row_cases import NAN, GradRows, assert_close, grad_rows_in_buffer, row_atol, truth
from topd_kernels.config import DIVERGENCE_CODES
from topd_kernels.rows import cuda_rows, torch_rows
from topd_kernels.rows.contract import make_row_call

DIVERGENCES = tuple(DIVERGENCE_CODES)


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


# ---------------------------------------------------------------------------------------------------
# Row tensors
# ---------------------------------------------------------------------------------------------------
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16),
]

# name: (B, T, student width, teacher width, vocab_size, student layout, teacher layout, temperature,
#        work split). A layout: laid_out's offset / stride_b / stride_t in elements ({}: contiguous).
# Offsets and strides that are multiples of 8 elements keep every row 16-byte aligned for every dtype.
LAYOUTS = {
    # 16-byte aligned rows: vector path, a scalar tail (997 = 124 * 8 + 5), then padding zeros
    "aligned": (2, 4, 1024, 1040, 997, {}, {}, 1.0, {}),
    # odd widths, contiguous: every row misaligned -> scalar path; widths differ, V < both
    "unaligned": (2, 4, 1003, 1001, 999, {}, {}, 0.7, {}),
    # views with gaps on both row dims, aligned -> vector path
    "strided_aligned": (2, 4, 1040, 1024, 1000, dict(offset=8, stride_b=4416, stride_t=1088),
                        dict(offset=16, stride_b=5000, stride_t=1104), 2.0, {}),
    # views with a misaligned base -> scalar path
    "strided_unaligned": (2, 4, 1010, 1030, 1010, dict(offset=3, stride_b=4500, stride_t=1100),
                          dict(offset=5, stride_b=4200, stride_t=1031), 1.0, {}),
    # aligned base and time stride, odd batch stride: rows of b >= 1 misaligned -> scalar path (the host
    # build throws on a misaligned 16-byte access, so a wrong alignment check fails here)
    "batch_stride_unaligned": (2, 4, 1024, 1024, 1000, dict(stride_b=4 * 1032 + 3, stride_t=1032), {}, 1.0, {}),
    # aligned base and batch stride, odd time stride -> scalar path
    "time_stride_unaligned": (2, 4, 1024, 1024, 1000, {}, dict(stride_b=4200, stride_t=1027), 1.0, {}),
    # logits[:, :-1] read in place: batch stride (T + 1) * width
    "sliced": (2, 4, 1024, 1040, 997, dict(stride_b=5 * 1024), dict(stride_b=5 * 1040), 1.0, {}),
    # one teacher sequence broadcast over the batch (batch stride 0)
    "broadcast_teacher": (2, 4, 1024, 1024, 1024, {}, dict(stride_b=0), 1.0, {}),
    # T = 1: the time stride never steps, odd values must not force the scalar path (nor matter)
    "single_position": (8, 1, 1024, 1040, 1000, dict(stride_b=1032, stride_t=3), dict(stride_b=1048, stride_t=5),
                        1.0, {}),
    # the packed layout (1, N, V), teacher with row gaps
    "packed": (1, 8, 1000, 1032, 999, {}, dict(offset=8, stride_t=1040), 1.0, {}),
    # the kernel's work split: rows cut in 64-column chunks, 3 cooperating "threads" per chunk
    "chunked": (2, 4, 1024, 1056, 1001, {}, dict(offset=8, stride_b=4 * 1064 + 8, stride_t=1064), 1.5,
                dict(chunk_cols=64, emulated_threads=3)),
}


def _nan_buffer_view(shape, dtype, device, *, offset=0, stride_b=None, stride_t=None, tail=0):
    """(a (B, T, V) view with the given element offset and dim-0 / dim-1 strides (default: contiguous),
    its NaN-filled 1-D buffer); `tail` NaN elements after the last row."""
    b, t, width = shape
    stride_t = width if stride_t is None else stride_t
    stride_b = t * stride_t if stride_b is None else stride_b
    extent = offset + (b - 1) * stride_b + (t - 1) * stride_t + width if b * t else offset
    buf = torch.full((extent + tail,), NAN, dtype=dtype, device=device)
    return buf.as_strided((b, t, width), (stride_b, stride_t, 1), offset), buf


def laid_out(values, dtype, *, batch=None, offset=0, stride_b=None, stride_t=None):
    """`values` (B, T, V), or (N, V) cut into `batch` rows of N // batch, cast to `dtype`, as a (B, T, V)
    view with the given element offset and dim-0 / dim-1 strides (default: contiguous) into a NaN-filled
    buffer (the gaps between rows hold NaN, which no kernel may read)."""
    if values.dim() == 2:
        batch = batch or 1
        values = values.reshape(batch, values.shape[0] // batch, values.shape[1])
    out, _ = _nan_buffer_view(values.shape, dtype, values.device, offset=offset, stride_b=stride_b,
                              stride_t=stride_t)
    stride_b = out.stride(0)
    if stride_b == 0:   # a broadcast batch dim: every batch entry reads the rows of the first
        out[:1].copy_(values[:1].to(dtype))
    else:
        out.copy_(values.to(dtype))
    return out


# ---------------------------------------------------------------------------------------------------
# Gradients handed in as the rows of larger NaN-filled buffers
# ---------------------------------------------------------------------------------------------------
def _round8(x):
    return (x + 7) // 8 * 8


# name: (offset, stride_b, stride_t) in elements of the rows of a (B, T, width) gradient in its 1-D buffer
# (GRAD_LAYOUTS adds the shared layouts of row_cases.GRAD_LAYOUTS). Multiples of 8 elements keep every row
# 16-byte aligned for every dtype (the vector path through the gradients' strides); one odd term makes the
# rows of that dim misaligned: the scalar path, or the host build throws on the misaligned 16-byte access.
_STRIDED_GRADS = {
    # aligned gaps on both row dims and before the first row -> vector path
    "aligned_gaps": lambda B, T, w: (8, (T + 1) * _round8(w + 8) + 8, _round8(w + 8)),
    # aligned base and time stride, odd batch stride: rows of b >= 1 misaligned -> scalar path
    "odd_batch_stride": lambda B, T, w: (0, T * _round8(w + 8) + 3, _round8(w + 8)),
    # aligned base and batch stride, odd time stride -> scalar path
    "odd_time_stride": lambda B, T, w: (0, _round8(T * (w + 3)) + 8, w + 3),
    # aligned strides, odd base -> scalar path
    "misaligned_base": lambda B, T, w: (5, (T + 1) * _round8(w + 8), _round8(w + 8)),
}
# "fresh": a new contiguous NaN-filled tensor; the shared layouts: "inner" (B, T + 2, V + 3)[:, 1:-1, :V]
# (odd strides and base), "causal" (B, T + 1, V)[:, :-1] (the gradient of logits[:, :-1]; aligned when V is a
# multiple of 8), "transposed" (T + 1, B, V + 2)[1:, :, :V].transpose(0, 1).
GRAD_LAYOUTS = ("fresh", *SHARED_GRAD_LAYOUTS, *_STRIDED_GRADS)


def grad_in_buffer(shape, dtype, device, layout) -> GradRows:
    """A (B, T, V) gradient laid out as GRAD_LAYOUTS[layout] in a NaN-filled buffer (row_cases.GradRows:
    the rows, the buffer, where the rows are in it; `untouched_outside()`)."""
    device = torch.device(device)
    if layout == "fresh":
        rows = torch.full(shape, NAN, dtype=dtype, device=device)
        return GradRows(rows, rows, torch.ones(shape, dtype=torch.bool, device=device))
    if layout in SHARED_GRAD_LAYOUTS:
        return grad_rows_in_buffer(shape, dtype, device, layout)
    offset, stride_b, stride_t = _STRIDED_GRADS[layout](*shape)
    rows, buf = _nan_buffer_view(shape, dtype, device, offset=offset, stride_b=stride_b, stride_t=stride_t, tail=8)
    inside = torch.zeros(buf.shape, dtype=torch.bool, device=device)
    inside.as_strided(rows.shape, rows.stride(), rows.storage_offset()).fill_(True)
    return GradRows(rows, buf, inside)


def flat(x):
    """(B, T, V) -> (N, V) (a copy when the view cannot be flattened): the rows that truth() reads."""
    return x.reshape(-1, x.shape[-1])


def at_row(x, i):
    """Row i = (i // T, i % T) of a (B, T, V) tensor, as a view."""
    return x[i // x.shape[1], i % x.shape[1]]


def make_call(student, teacher, vocab_size, temperature, divergence, beta=0.5):
    """The contract's RowCall, divergence by name."""
    return make_row_call(student, teacher, vocab_size, temperature, DIVERGENCE_CODES[divergence], beta)


def row_stats(student, teacher, coef, call):
    """The contract's statistics (float32, torch backend forward) with mask = coef != 0."""
    return torch_rows.row_forward(student, teacher, coef != 0, call)


def nan_aware_equal(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def run_and_check(student, teacher, coef, V, tau, divergence, beta, want_teacher, *, stats=None,
                  grads=("fresh", "fresh"), **work_split):
    """One backward call (host build on CPU tensors, the kernel on CUDA tensors) against the float64
    truth, written into gradients laid out as `grads` (GRAD_LAYOUTS names, student's and teacher's; the
    teacher's unused without want_teacher) in NaN-filled buffers: every row written in full (no NaN left),
    masked rows and padding exact zeros, nothing outside the rows touched, inputs untouched.
    Returns (grad_student, grad_teacher or None): the rows written."""
    call = make_call(student, teacher, V, tau, divergence, beta)
    stats = row_stats(student, teacher, coef, call) if stats is None else stats
    before = [x.clone() for x in (student, teacher, stats, coef)]
    into_s = grad_in_buffer(student.shape, student.dtype, student.device, grads[0])
    into_t = grad_in_buffer(teacher.shape, teacher.dtype, teacher.device, grads[1]) if want_teacher else None
    assert cuda_rows.run_backward(student, teacher, stats, coef, call, into_s.rows,
                                  into_t.rows if want_teacher else None, **work_split) is None
    for x, old in zip((student, teacher, stats, coef), before):
        assert nan_aware_equal(x, old), "an input was modified"
    gs, gt = into_s.rows, into_t.rows if want_teacher else None
    assert gs.shape == student.shape and gs.dtype == student.dtype
    assert into_s.untouched_outside(), f"grad_student: written outside its rows ({grads[0]})"
    if want_teacher:
        assert gt.shape == teacher.shape and gt.dtype == teacher.dtype
        assert into_t.untouched_outside(), f"grad_teacher: written outside its rows ({grads[1]})"
    fs, ft = flat(student), flat(teacher)
    _, want_s, want_t = truth(fs, ft, coef, V, tau, divergence, beta, want_teacher=want_teacher)
    atol = row_atol(fs, ft, coef, stats, V, tau)
    masked = coef == 0
    assert_close(flat(gs), want_s, "grad_student", atol)   # also: no NaN (unwritten) entry
    assert (flat(gs)[masked] == 0).all() and (gs[..., V:] == 0).all()
    if want_teacher:
        assert_close(flat(gt), want_t, "grad_teacher", atol)
        assert (flat(gt)[masked] == 0).all() and (gt[..., V:] == 0).all()
    return gs, gt


def fresh_backward(student, teacher, stats, coef, call, want_teacher, backward=None):
    """(grad_student, grad_teacher or None): `backward` (default cuda_rows.row_backward; any function or op
    with the contract's mutating signature) written into fresh contiguous NaN-filled tensors."""
    backward = backward or cuda_rows.row_backward
    gs = torch.full(student.shape, NAN, dtype=student.dtype, device=student.device)
    gt = torch.full(teacher.shape, NAN, dtype=teacher.dtype, device=teacher.device) if want_teacher else None
    assert backward(student, teacher, stats, coef, call, gs, gt) is None
    return gs, gt
