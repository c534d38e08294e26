"""Structural memory facts: a sliced (B, T, V) view such as `logits[:, :-1]` is read in place (no N x V copy),
in the forward and the backward. Measured with the benchmarks' storage tracker (benchmarks/harness/memtrack.py),
which counts every tensor storage allocated through the dispatcher while it is active."""
import sys
from pathlib import Path

import pytest
import torch

import topd_kernels
from common import TOPD
from topd_kernels.rows import torch_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness.memtrack import StorageTracker, cuda_peak  # noqa: E402

B, T, V = 4, 65, 2048


def sliced_inputs(device, dtype=torch.float32):
    base_s = torch.randn(B, T, V, device=device, dtype=dtype)
    base_t = torch.randn(B, T, V, device=device, dtype=dtype)
    return base_s[:, :-1], base_t[:, :-1]


@pytest.mark.parametrize("config", [dict(), TOPD], ids=["opd", "topd"])
def test_sliced_view_is_never_copied_cpu(seed, monkeypatch, config):
    """torch backend, fp32: forward peak far below one N x V tensor; backward peak the gradient plus a little."""
    monkeypatch.setattr(torch_rows, "CHUNK_ELEMENTS", 1 << 14)  # temporaries small against N x V
    view_s, view_t = sliced_inputs("cpu")
    n_v_bytes = view_s.numel() * view_s.element_size()
    student = view_s.detach().requires_grad_(True)  # a leaf that keeps the view's strides
    assert student.stride() == view_s.stride() and not student.is_contiguous()
    with StorageTracker() as forward:
        loss = topd_kernels.fused_window_kl(student, view_t, backend="torch", **config)
    with StorageTracker() as backward:
        (grad,) = torch.autograd.grad(loss, student)
    assert grad.shape == student.shape
    assert forward.peak_bytes < 0.25 * n_v_bytes, (forward.peak_bytes, n_v_bytes)
    assert backward.peak_bytes < 1.25 * n_v_bytes, (backward.peak_bytes, n_v_bytes)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "triton+cuda"])
def test_sliced_view_is_never_copied_gpu(seed, backend):
    view_s, view_t = sliced_inputs("cuda", torch.bfloat16)
    n_v_bytes = view_s.numel() * view_s.element_size()
    student = view_s.detach().requires_grad_(True)
    with cuda_peak() as forward:
        loss = topd_kernels.fused_window_kl(student, view_t, backend=backend, **TOPD)
    with cuda_peak() as backward:
        torch.autograd.grad(loss, student)
    assert forward["peak_bytes"] < 0.25 * n_v_bytes, (forward, n_v_bytes)
    assert backward["peak_bytes"] < 1.25 * n_v_bytes, (backward, n_v_bytes)
