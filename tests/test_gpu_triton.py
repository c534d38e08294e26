"""The compiled Triton row kernels at realistic shapes on a GPU (skipped without CUDA, see conftest.py).

Triton against the torch row backend on every row, and against the float64 reference on a subset of
rows (to keep the reference cheap). Outputs are NaN-poisoned before the kernels run.
"""
import pytest
import torch

from topd_kernels import reference, torch_rows

pytestmark = pytest.mark.gpu

DIVERGENCES = ["reverse_kl", "forward_kl", "jsd"]
BETA = 0.3
BF16_ULP = 2.0 ** -7


def logits(n, v, dtype=torch.bfloat16, pad=(0, 0), seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    student = torch.randn(n, v + pad[0], device="cuda", generator=gen).mul_(3.0)
    teacher = torch.randn(n, v + pad[1], device="cuda", generator=gen).mul_(1.8)
    teacher[:, :v].add_(student[:, :v], alpha=0.8)
    return student.to(dtype), teacher.to(dtype)


def triton_rows_module():
    from topd_kernels import triton_rows  # imported here: collection must not need a GPU
    return triton_rows


def run(rows, student, teacher, V, tau, divergence, coef, teacher_grad):
    stats = rows.row_forward(student, teacher, V, tau, divergence, BETA)
    grad_s = torch.full_like(student, float("nan"))
    grad_t = torch.full_like(teacher, float("nan")) if teacher_grad else None
    rows.row_backward(student, teacher, stats, coef, V, tau, divergence, BETA, grad_s, grad_t)
    return stats, grad_s, grad_t


def check_against_float64(stats, grads, student, teacher, V, tau, divergence, coef, subset):
    """Rows `subset` against the float64 reference (d by token_divergence, gradients by autograd)."""
    s = student[subset, :V].double().requires_grad_(True)
    t = teacher[subset, :V].double().requires_grad_(True)
    d = reference.token_divergence(s, t, divergence, BETA, tau)
    true = torch.autograd.grad((d * coef[subset].double()).sum(), [s, t])
    lse = torch.stack([torch.logsumexp(s.detach() / tau, -1), torch.logsumexp(t.detach() / tau, -1)])
    size = 1.0 + lse.abs().max().item() + d.abs().max().item()
    assert torch.allclose(stats[:2, subset].double(), lse, rtol=0, atol=4e-7 * size)
    assert torch.allclose(stats[2, subset].double(), d.detach(), rtol=0, atol=4e-7 * size)
    for grad, truth in zip(grads, true):
        if grad is None:
            continue
        g = grad[subset, :V].double()
        bound = 4e-7 * size * coef[subset].abs().max().item() / tau + BF16_ULP * truth.abs()
        assert bool(((g - truth).abs() <= bound).all()), (g - truth).abs().max().item()


@pytest.mark.parametrize("V", [151936, 128256])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_realistic_shapes_match_torch_and_reference(nan_poisoned_empty, V, divergence):
    """N = 8192 rows of a Qwen (151936) / Llama-3 (128256) vocabulary in bf16, teacher gradient on."""
    tr = triton_rows_module()
    N = 8192
    student, teacher = logits(N, V, pad=(0, 128) if V == 151936 else (0, 0))
    coef = torch.randn(N, device="cuda")
    coef[::7] = 0.0
    stats, gs, gt = run(tr, student, teacher, V, 1.0, divergence, coef, teacher_grad=True)
    assert torch.isfinite(stats).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    ref_stats, ref_gs, ref_gt = run(torch_rows, student, teacher, V, 1.0, divergence, coef, teacher_grad=True)
    size = 1.0 + ref_stats[:3].abs().max().item()
    assert torch.allclose(stats, ref_stats, rtol=0, atol=1e-6 * size)
    for grad, ref in ((gs, ref_gs), (gt, ref_gt)):
        # both compute in float32 and round once to bf16: at most one bf16 ulp apart (plus fp32 noise)
        diff = (grad.float() - ref.float()).abs()
        assert bool((diff <= BF16_ULP * ref.float().abs() + 1e-6 * coef.abs().max().item()).all())
        assert torch.equal(grad[::7], torch.zeros_like(grad[::7]))
        assert torch.equal(grad[:, V:], torch.zeros_like(grad[:, V:]))
    subset = torch.cat([torch.arange(0, 16), torch.arange(N - 16, N)]).cuda()
    check_against_float64(stats, (gs, gt), student, teacher, V, 1.0, divergence, coef, subset)


def test_int64_offsets(nan_poisoned_empty):
    """N * V > 2^31 (N = 16384, V = 151936): the last rows are read and written at the right place."""
    tr = triton_rows_module()
    N, V = 16384, 151936
    assert N * V > 2 ** 31
    student, teacher = logits(N, V, seed=1)
    coef = torch.randn(N, device="cuda")
    stats, gs, _ = run(tr, student, teacher, V, 0.7, "reverse_kl", coef, teacher_grad=False)
    assert torch.isfinite(stats).all() and torch.isfinite(gs).all()
    subset = torch.cat([torch.arange(0, 8), torch.arange(14130, 14140), torch.arange(N - 8, N)]).cuda()
    check_against_float64(stats, (gs, None), student, teacher, V, 0.7, "reverse_kl", coef, subset)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_autotuned_path_matches_default(monkeypatch, divergence):
    """TOPD_TRITON_AUTOTUNE=1 (GPU only) gives the same results as the default configuration."""
    tr = triton_rows_module()
    student, teacher = logits(256, 32000, dtype=torch.float16, pad=(64, 0), seed=2)
    coef = torch.randn(256, device="cuda")
    default = run(tr, student, teacher, 32000, 0.7, divergence, coef, teacher_grad=True)
    monkeypatch.setenv("TOPD_TRITON_AUTOTUNE", "1")
    tuned = run(tr, student, teacher, 32000, 0.7, divergence, coef, teacher_grad=True)
    assert torch.allclose(default[0], tuned[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(default[1:], tuned[1:]):
        assert torch.allclose(a.float(), b.float(), rtol=2 ** -9, atol=1e-6)


def test_full_loss_on_gpu(seed):
    """fused_window_kl(backend="triton") on CUDA tensors against the float64 reference (mean reduction)."""
    import topd_kernels
    from topd_kernels.reference import window_kl_reference

    student, teacher = logits(6 * 40, 50304, pad=(0, 64), seed=3)
    student = student.view(6, 40, -1)
    teacher = teacher.view(6, 40, -1)
    mask = torch.rand(6, 40, device="cuda") > 0.1
    kwargs = dict(mask=mask, vocab_size=50304, window=4, gamma=0.8, suppress_weight=0.3, guidance_weight=0.5,
                  loss_threshold=topd_kernels.Quantile(0.5), div_threshold=topd_kernels.Quantile(0.5))
    s1 = student.detach().clone().requires_grad_(True)
    loss = topd_kernels.fused_window_kl(s1, teacher, backend="triton", **kwargs)
    loss.backward()
    s2 = student.detach().clone().requires_grad_(True)
    ref = window_kl_reference(s2, teacher, **kwargs)
    ref.backward()
    assert torch.allclose(loss.double(), ref, rtol=2e-5, atol=1e-6)
    scale = s2.grad.abs().max().item()
    assert bool(((s1.grad.double() - s2.grad.double()).abs() <= BF16_ULP * s2.grad.double().abs() + 1e-5 * scale).all())
