"""The compiled Triton row kernels at realistic shapes on a GPU (skipped without CUDA, see conftest.py).

Triton against the torch row backend on every row, and against the float64 reference on a subset of
rows (to keep the reference cheap), through the registered row ops (`topd_kernels/rows/contract.py`).
Outputs are NaN-poisoned before the kernels run; gradients are also written into the rows of larger
NaN-filled buffers (the causal grad_base[:, :-1] of functional.py, and past 2^31 elements), which must match
the fresh contiguous result bit for bit with nothing outside the rows touched. (tests/test_triton_rows.py runs
on the GPU too, with the compiled kernels: the precision cases, large common offsets included, live there.)
"""
import pytest
import torch

from row_cases import grad_rows_in_buffer
from topd_kernels import reference
from topd_kernels.config import DIVERGENCE_CODES
from topd_kernels.rows import torch_rows
from topd_kernels.rows.contract import Stat, make_row_call

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
    from topd_kernels.rows import triton_rows  # imported here: collection must not need a GPU
    return triton_rows


def as_rows(x):
    """(B, T, V) row view: 3-D as is, 2-D (N, V) as the packed (1, N, V)."""
    return x if x.dim() == 3 else x.unsqueeze(0)


def run(rows, student, teacher, V, tau, divergence, coef, teacher_grad, mask=None):
    """(stats, grad_student, grad_teacher or None) of a row backend module's ops; gradients (N, V*)."""
    s3, t3 = as_rows(student), as_rows(teacher)
    n = s3.shape[0] * s3.shape[1]
    mask = torch.ones(n, dtype=torch.bool, device="cuda") if mask is None else mask
    call = make_row_call(s3, t3, V, tau, DIVERGENCE_CODES[divergence], BETA)
    stats = rows.OPS.forward(s3, t3, mask, call)
    grad_s, grad_t = rows.OPS.backward(s3, t3, stats, coef, call, teacher_grad)
    return stats, grad_s.view(n, -1), None if grad_t is None else grad_t.view(n, -1)


def check_written_into_rows(rows, student, teacher, stats, coef, call, want, layout="causal"):
    """The backward writing into strided rows of NaN-filled buffers (row_cases.grad_rows_in_buffer) gives
    `want` (the fresh contiguous (grad_student, grad_teacher or None), viewed (N, V*)) bit for bit, and
    leaves everything outside the rows NaN."""
    s3, t3 = as_rows(student), as_rows(teacher)
    into_s = grad_rows_in_buffer(s3.shape, s3.dtype, "cuda", layout)
    into_t = None if want[1] is None else grad_rows_in_buffer(t3.shape, t3.dtype, "cuda", layout)
    rows.OPS.backward_into(s3, t3, stats, coef, call, into_s.rows, None if into_t is None else into_t.rows)
    for into, expected in ((into_s, want[0]), (into_t, want[1])):
        if into is None:
            continue
        assert torch.equal(into.rows.reshape(expected.shape), expected)
        assert into.untouched_outside()


def row_subset(x, subset):
    """Rows `subset` (flat indices) of 2-D or 3-D logits, as an (R, V*) copy of just those rows."""
    x = as_rows(x)
    return x[subset // x.shape[1], subset % x.shape[1]]


def check_against_float64(stats, grads, student, teacher, V, tau, divergence, coef, subset):
    """Rows `subset` against the float64 reference (d by token_divergence, gradients by autograd)."""
    s = row_subset(student, subset)[:, :V].double().requires_grad_(True)
    t = row_subset(teacher, subset)[:, :V].double().requires_grad_(True)
    d = reference.token_divergence(s, t, divergence, BETA, tau)
    true = torch.autograd.grad((d * coef[subset].double()).sum(), [s, t])
    maxima = torch.stack([s.detach().amax(-1), t.detach().amax(-1)])
    logsums = torch.stack([torch.logsumexp((s.detach() - maxima[0, :, None]) / tau, -1),
                           torch.logsumexp((t.detach() - maxima[1, :, None]) / tau, -1)])
    lse = maxima / tau + logsums
    size = 1.0 + lse.abs().max().item() + d.abs().max().item()
    assert torch.equal(stats[[Stat.MAX_S, Stat.MAX_T]][:, subset].double(), maxima)  # the raw maxima, exactly
    assert torch.allclose(stats[[Stat.LOGSUM_S, Stat.LOGSUM_T]][:, subset].double(), logsums, rtol=0,
                          atol=4e-7 * size)
    assert torch.allclose(stats[Stat.KL, subset].double(), d.detach(), rtol=0, atol=4e-7 * size)
    for grad, truth in zip(grads, true):
        if grad is None:
            continue
        g = grad[subset, :V].double()
        bound = 4e-7 * size * coef[subset].abs().max().item() / tau + BF16_ULP * truth.abs()
        assert bool(((g - truth).abs() <= bound).all()), (g - truth).abs().max().item()


def assert_stats_match_torch(stats, ref_stats, tau):
    """Triton's statistics against the torch backend's: maxima exactly, the rest at float32 accuracy of the
    size of the log-sum-exps (MAX / tau + LOGSUM) and divergences of the rows."""
    assert torch.equal(stats[[Stat.MAX_S, Stat.MAX_T]], ref_stats[[Stat.MAX_S, Stat.MAX_T]])
    lse = torch.stack([ref_stats[Stat.MAX_S] / tau + ref_stats[Stat.LOGSUM_S],
                       ref_stats[Stat.MAX_T] / tau + ref_stats[Stat.LOGSUM_T]])
    size = 1.0 + max(lse.abs().max().item(), ref_stats[Stat.KL].abs().max().item())
    others = [Stat.LOGSUM_S, Stat.LOGSUM_T, Stat.KL, Stat.MIX_S, Stat.MIX_T]
    assert torch.allclose(stats[others], ref_stats[others], rtol=0, atol=1e-6 * size)


@pytest.mark.parametrize("V", [151936, 128256])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_realistic_shapes_match_torch_and_reference(nan_poisoned_empty, V, divergence):
    """N = 8192 rows of a Qwen (151936) / Llama-3 (128256) vocabulary in bf16, teacher gradient on, read in
    place from (B, T + 1, V*)[:, :-1] (the causal shift); masked rows hold NaN logits and are not read."""
    tr = triton_rows_module()
    B, T = 8, 1024
    N = B * T
    pad = (0, 128) if V == 151936 else (0, 0)
    student, teacher = logits(B * (T + 1), V, pad=pad)
    student, teacher = student.view(B, T + 1, -1)[:, :-1], teacher.view(B, T + 1, -1)[:, :-1]
    mask = torch.ones(N, dtype=torch.bool, device="cuda")
    mask[5::97] = False
    masked = (~mask).nonzero().flatten()
    student[masked // T, masked % T] = float("nan")
    teacher[masked // T, masked % T] = float("nan")
    coef = torch.randn(N, device="cuda")
    coef[::7] = 0.0
    coef[~mask] = 0.0
    stats, gs, gt = run(tr, student, teacher, V, 1.0, divergence, coef, teacher_grad=True, mask=mask)
    assert torch.isfinite(stats).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.equal(stats[:, masked], torch.zeros_like(stats[:, masked]))
    ref_stats, ref_gs, ref_gt = run(torch_rows, student, teacher, V, 1.0, divergence, coef, teacher_grad=True,
                                    mask=mask)
    assert_stats_match_torch(stats, ref_stats, 1.0)
    for grad, ref in ((gs, ref_gs), (gt, ref_gt)):
        # both compute in float32 and round once to bf16: at most one bf16 ulp apart (plus fp32 noise)
        diff = (grad.float() - ref.float()).abs()
        assert bool((diff <= BF16_ULP * ref.float().abs() + 1e-6 * coef.abs().max().item()).all())
        assert torch.equal(grad[::7], torch.zeros_like(grad[::7]))
        assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))
        assert torch.equal(grad[:, V:], torch.zeros_like(grad[:, V:]))
    subset = torch.cat([torch.arange(0, 16), torch.arange(N - 16, N)]).cuda()
    subset = subset[mask[subset]]
    check_against_float64(stats, (gs, gt), student, teacher, V, 1.0, divergence, coef, subset)
    # the gradients written into the rows of grad_base[:, :-1] (functional.py's causal shift), in place
    del ref_stats, ref_gs, ref_gt
    call = make_row_call(student, teacher, V, 1.0, DIVERGENCE_CODES[divergence], BETA)
    check_written_into_rows(tr, student, teacher, stats, coef, call, (gs, gt))


def test_int64_offsets(nan_poisoned_empty):
    """N * V > 2^31 (N = 16384, V = 151936) as (B, T) = (2, 8192): the last rows are read and written at the
    right place (b * stride_b + t * stride_t and the gradient rows in 64 bits)."""
    tr = triton_rows_module()
    N, V = 16384, 151936
    assert N * V > 2 ** 31
    student, teacher = logits(N, V, seed=1)
    student, teacher = student.view(2, N // 2, V), teacher.view(2, N // 2, V)
    coef = torch.randn(N, device="cuda")
    stats, gs, _ = run(tr, student, teacher, V, 0.7, "reverse_kl", coef, teacher_grad=False)
    assert torch.isfinite(stats).all() and torch.isfinite(gs).all()
    subset = torch.cat([torch.arange(0, 8), torch.arange(14130, 14140), torch.arange(N - 8, N)]).cuda()
    check_against_float64(stats, (gs, None), student, teacher, V, 0.7, "reverse_kl", coef, subset)
    # written into strided rows whose offsets pass 2^31 too (b * stride_b + t * stride_t in 64 bits)
    call = make_row_call(student, teacher, V, 0.7, DIVERGENCE_CODES["reverse_kl"], BETA)
    check_written_into_rows(tr, student, teacher, stats, coef, call, (gs, None), layout="inner")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_autotuned_path_matches_default(monkeypatch, divergence):
    """AUTOTUNE (TOPD_TRITON_AUTOTUNE=1 at import; GPU only) gives the same results as the default
    configuration."""
    tr = triton_rows_module()
    student, teacher = logits(256, 32000, dtype=torch.float16, pad=(64, 0), seed=2)
    coef = torch.randn(256, device="cuda")
    monkeypatch.setattr(tr, "AUTOTUNE", False)
    default = run(tr, student, teacher, 32000, 0.7, divergence, coef, teacher_grad=True)
    monkeypatch.setattr(tr, "AUTOTUNE", True)
    tuned = run(tr, student, teacher, 32000, 0.7, divergence, coef, teacher_grad=True)
    assert torch.allclose(default[0], tuned[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(default[1:], tuned[1:]):
        assert torch.allclose(a.float(), b.float(), rtol=2 ** -9, atol=1e-6)


@pytest.mark.parametrize("want_teacher", [True, False])
def test_opcheck_triton_ops(want_teacher):
    """The registered ops pass torch.library.opcheck on CUDA tensors (schema, fake tensors traced through
    wrap_triton, autograd registration, AOT dispatch; the backward's declared mutation of its gradients),
    with strided (B, T, V) views, a mask, and gradients that are strided rows of larger tensors."""
    tr = triton_rows_module()
    student, teacher = logits(2 * 9, 300, dtype=torch.float32, pad=(5, 20), seed=4)
    student, teacher = student.view(2, 9, -1)[:, 1:], teacher.to(torch.bfloat16).view(2, 9, -1)[:, :-1]
    mask = torch.rand(16, device="cuda") > 0.2
    for divergence in DIVERGENCES:
        call = make_row_call(student, teacher, 300, 0.7, DIVERGENCE_CODES[divergence], BETA)
        torch.library.opcheck(tr.OPS.forward_op, (student, teacher, mask, *call))
        stats = tr.OPS.forward(student, teacher, mask, call)
        coef = torch.randn(16, device="cuda") * mask
        grad_s = torch.zeros(2, 9, student.shape[-1], device="cuda")[:, :-1]
        grad_t = torch.zeros(2, 9, teacher.shape[-1], dtype=teacher.dtype, device="cuda")[:, 1:] \
            if want_teacher else None
        torch.library.opcheck(tr.OPS.backward_op, (student, teacher, stats, coef, *call, grad_s, grad_t))


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
