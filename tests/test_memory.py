"""Structural memory facts: a sliced (B, T, V) view such as `logits[:, :-1]` is read in place (no N x V copy)
in the forward, and its gradient is written into its base's gradient in the backward (no second N x V). Measured with the benchmarks' storage tracker (benchmarks/harness/memtrack.py),
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
    """A model's logits (B, T, V) that need a gradient, their causal shift `[:, :-1]` and a teacher's."""
    base = torch.randn(B, T, V, device=device, dtype=dtype, requires_grad=True)
    teacher = torch.randn(B, T, V, device=device, dtype=dtype)
    return base, base[:, :-1], teacher[:, :-1]


@pytest.mark.parametrize("config", [dict(), TOPD], ids=["opd", "topd"])
def test_sliced_view_is_never_copied_cpu(seed, monkeypatch, config):
    """torch backend, fp32: the forward's peak is far below one N x V tensor (the view is read in place);
    the backward's is the base's gradient plus a little: the view's rows are written into it directly
    (no gradient of the view scattered into a second one, as autograd's slice backward would)."""
    monkeypatch.setattr(torch_rows, "CHUNK_ELEMENTS", 1 << 14)  # temporaries small against N x V
    base, student, teacher = sliced_inputs("cpu")
    base_bytes = base.numel() * base.element_size()
    with StorageTracker() as forward:
        loss = topd_kernels.fused_window_kl(student, teacher, backend="torch", **config)
    with StorageTracker() as backward:
        (grad,) = torch.autograd.grad(loss, base)
    assert torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1]))
    assert forward.peak_bytes < 0.25 * base_bytes, (forward.peak_bytes, base_bytes)
    assert backward.peak_bytes < 1.25 * base_bytes, (backward.peak_bytes, base_bytes)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "triton+cuda"])
def test_sliced_view_is_never_copied_gpu(seed, backend):
    base, student, teacher = sliced_inputs("cuda", torch.bfloat16)
    base_bytes = base.numel() * base.element_size()
    with cuda_peak() as forward:
        loss = topd_kernels.fused_window_kl(student, teacher, backend=backend, **TOPD)
    with cuda_peak() as backward:
        torch.autograd.grad(loss, base)
    assert forward["peak_bytes"] < 0.25 * base_bytes, (forward, base_bytes)
    assert backward["peak_bytes"] < 1.25 * base_bytes, (backward, base_bytes)
