"""Shared by the CUDA-extension tests (host build and GPU): whether the extension can have been built, and
inputs / outputs with chosen memory layouts. The random logits, the float64 truth and the float32 +
output-rounding tolerance are those of all the row tests: row_cases.py."""
from __future__ import annotations

import os
import shutil

import torch

from row_cases import NAN


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


def laid_out(values, dtype, *, offset=0, row_stride=None):
    """`values` (n, width) cast to `dtype`, as a view with the given element offset and row stride into a
    NaN-filled buffer."""
    out = _strided(values.shape, dtype, values.device, offset, row_stride)
    out.copy_(values.to(dtype))
    return out


def like(x, *, offset=0, row_stride=None):
    """A NaN-filled output with x's shape and dtype, with its own offset and row stride."""
    return _strided(x.shape, x.dtype, x.device, offset, row_stride)


def _strided(shape, dtype, device, offset, row_stride):
    n, width = shape
    row_stride = row_stride or width
    buf = torch.full((offset + n * row_stride + width,), NAN, dtype=dtype, device=device)
    return buf.as_strided((n, width), (row_stride, 1), offset)
