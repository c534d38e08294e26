"""`fused_window_kl(..., backend="triton")` end to end against the float64 reference.

Uses the shared machinery of `loss_cases.py` (the same checks the torch backend passes): loss, every
statistic and both gradients against `reference.window_kl_reference`, random upstream gradients for
reduction="none", the three-way precision check at low precision, inputs unchanged. Runs in the Triton
interpreter on a machine without CUDA (conftest.py), on the GPU otherwise.
"""
import pytest
import torch

import topd_kernels
from topd_kernels import Quantile
from loss_cases import check_backend, make_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIVERGENCES = ["reverse_kl", "forward_kl", "jsd"]
TOPD = dict(window=3, gamma=0.5, loss_threshold=Quantile(0.4), div_threshold=Quantile(0.5),
            suppress_weight=0.25, guidance_weight=0.8)


@pytest.fixture(autouse=True)
def poisoned(nan_poisoned_empty):
    """torch.empty returns NaN-filled tensors (conftest.py): stats and gradients the backend allocates."""


def on_device(problem):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_defaults_and_topd(seed, layout, divergence):
    """Plain OPD (the defaults) and TOPD weighting, bf16, reduction="none" with a random upstream."""
    problem = on_device(make_problem(layout, dtype=torch.bfloat16))
    check_backend("triton", problem, divergence=divergence, beta=0.3)
    check_backend("triton", problem, divergence=divergence, beta=0.3, reduction="none", **TOPD)


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_mixed_dtypes_truncation_temperature_teacher_grad(seed, layout, divergence):
    """fp32 student / bf16 teacher with padded vocabularies of different sizes, tau = 0.7, teacher grad."""
    problem = on_device(make_problem(layout, V=1271, dtype=torch.float32, teacher_dtype=torch.bfloat16,
                                     pad=(9, 128)))
    check_backend("triton", problem, teacher_grad=True, divergence=divergence, beta=0.3, temperature=0.7,
                  reduction="none", **TOPD)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_negative_infinity_and_fp16(seed, divergence):
    problem = on_device(make_problem("packed", V=257, dtype=torch.float16, neg_inf=True))
    check_backend("triton", problem, teacher_grad=True, divergence=divergence, reduction="sum", **TOPD)


def test_many_blocks_per_row(seed, monkeypatch):
    """Force small blocks: the online rescaling across blocks inside the full loss."""
    monkeypatch.setenv("TOPD_TRITON_BLOCK_V", "128")
    problem = on_device(make_problem("batched", B=2, T=9, V=1000, dtype=torch.bfloat16, pad=(24, 0)))
    check_backend("triton", problem, teacher_grad=True, divergence="reverse_kl", reduction="none", **TOPD)


def test_non_contiguous_rows(seed):
    """Logits that are column slices of wider tensors (a row stride)."""
    wide_s, wide_t = torch.randn(2, 15, 400, device=DEVICE), torch.randn(2, 15, 400, device=DEVICE)
    student, teacher = wide_s[..., 50:350], wide_t[..., 100:400]
    problem = dict(student=student, teacher=teacher, mask=torch.rand(2, 15, device=DEVICE) > 0.2,
                   cu_seqlens=None, vocab_size=None)
    check_backend("triton", problem, teacher_grad=True, **TOPD)


def test_matches_torch_backend(seed):
    """Triton and torch backends agree closely (both float32 inside)."""
    problem = on_device(make_problem("packed", V=503, dtype=torch.bfloat16))
    kwargs = dict(mask=problem["mask"], cu_seqlens=problem["cu_seqlens"], divergence="jsd", beta=0.3, **TOPD)
    out = {}
    for backend in ("torch", "triton"):
        student = problem["student"].clone().requires_grad_(True)
        loss, stats = topd_kernels.fused_window_kl(student, problem["teacher"], backend=backend,
                                                   return_stats=True, **kwargs)
        loss.backward()
        out[backend] = (loss, stats, student.grad)
    assert torch.allclose(out["torch"][0], out["triton"][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(out["torch"][1].kl, out["triton"][1].kl, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out["torch"][2].float(), out["triton"][2].float(), rtol=2 ** -7, atol=1e-6)
