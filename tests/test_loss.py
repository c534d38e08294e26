"""`fused_window_kl` end to end, every backend, against the float64 reference on fresh random inputs.

Each case runs on every registered backend (tests/common.py: on a machine without CUDA the Triton kernels
run in the interpreter and the CUDA extension's backward in its host build). `loss_cases.check_backend`
compares the loss, every statistic and both gradients with `reference.window_kl_reference` (random upstream
gradients for reduction="none", the three-way precision check at low precision, inputs unchanged). Every
tensor a backend allocates with torch.empty starts as NaN (autouse fixture), so an unwritten element fails.
"""
import pytest
import torch

import topd_kernels
from common import BACKENDS, BETA, DEVICE, DIVERGENCES, TOPD
from loss_cases import check_backend, make_problem
from topd_kernels.reference import window_kl_reference
from topd_kernels.rows import torch_rows


@pytest.fixture(autouse=True)
def poisoned(nan_poisoned_empty):
    """torch.empty / empty_like return NaN-filled tensors during every test of this module."""


# The window step (window scores, thresholds, weights, reductions) is one code path shared by every backend:
# its full matrix runs through the torch backend; the kernel backends see TOPD weights, every reduction kind
# they return ("mean" / "none") and every row-level variation in the other tests.
WINDOW_STEP_BACKENDS = ("torch",)


def on_device(problem):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}


def run(backend, student, teacher, **kwargs):
    """(loss, stats, grad_student) of one call."""
    student = student.detach().requires_grad_(True)
    loss, stats = topd_kernels.fused_window_kl(student, teacher, backend=backend, return_stats=True, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    return loss, stats, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_defaults_and_topd(seed, backend, layout, divergence, dtype):
    problem = on_device(make_problem(layout, dtype=dtype))
    check_backend(backend, problem, divergence=divergence, beta=BETA)
    check_backend(backend, problem, divergence=divergence, beta=BETA, reduction="none", **TOPD)


@pytest.mark.parametrize("backend", WINDOW_STEP_BACKENDS)
@pytest.mark.parametrize("window", [1, 3, 100])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_window_and_gamma(seed, backend, window, gamma, layout):
    """T = 63, and a window longer than every sequence."""
    problem = on_device(make_problem(layout, T=63, V=97))
    check_backend(backend, problem, **{**TOPD, "window": window, "gamma": gamma})


@pytest.mark.parametrize("backend", WINDOW_STEP_BACKENDS)
@pytest.mark.parametrize("thresholds", [
    dict(loss_threshold=0.3, div_threshold=0.4),
    dict(loss_threshold=topd_kernels.Quantile(0.0), div_threshold=topd_kernels.Quantile(1.0)),
    dict(loss_threshold=None, div_threshold=topd_kernels.Quantile(0.7)),
    dict(loss_threshold=topd_kernels.Quantile(0.9), div_threshold=None),
])
@pytest.mark.parametrize("weights", [(0.0, 0.0), (1.0, 0.0), (0.4, 2.5)])
def test_thresholds_and_weights(seed, backend, thresholds, weights):
    problem = on_device(make_problem("packed", V=211, scale=1.0))
    check_backend(backend, problem, window=4, gamma=0.8, suppress_weight=weights[0],
                  guidance_weight=weights[1], **thresholds)


@pytest.mark.parametrize("backend", WINDOW_STEP_BACKENDS)
@pytest.mark.parametrize("reduction,num_items", [
    ("mean", None), ("mean", 37.5), ("sum", None), ("batchmean", None), ("batchmean", 5), ("none", None)])
@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_reductions(seed, backend, reduction, num_items, layout):
    problem = on_device(make_problem(layout, V=301))
    check_backend(backend, problem, reduction=reduction, num_items=num_items, **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_temperature_and_teacher_grad(seed, backend, divergence, temperature):
    problem = on_device(make_problem("batched", V=503))
    check_backend(backend, problem, teacher_grad=True, divergence=divergence, beta=BETA,
                  temperature=temperature, reduction="none", **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_mixed_dtypes_and_vocab_truncation(seed, backend, dtypes, divergence):
    """Vocabulary 1271 read from rows padded to different widths (garbage past it)."""
    problem = on_device(make_problem("packed", V=1271, dtype=dtypes[0], teacher_dtype=dtypes[1], pad=(9, 128)))
    check_backend(backend, problem, teacher_grad=True, divergence=divergence, beta=BETA, temperature=0.7,
                  **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_negative_infinity_logits(seed, backend, divergence, dtype):
    problem = on_device(make_problem("batched", V=257, dtype=dtype, neg_inf=True))
    check_backend(backend, problem, teacher_grad=True, divergence=divergence, beta=BETA, reduction="sum", **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_common_offset(seed, backend, divergence, temperature):
    """Logits near 1e4 (float32): as accurate as a plain float32 log_softmax, gradients included."""
    problem = on_device(make_problem("batched", V=1271, offset=1e4))
    check_backend(backend, problem, teacher_grad=True, divergence=divergence, beta=BETA,
                  temperature=temperature, reduction="none", **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_beta_jsd_teacher_gradient(seed, backend):
    """JSD's teacher term is its own statistic: no cancellation as beta -> 0."""
    problem = on_device(make_problem("packed", V=311))
    check_backend(backend, problem, teacher_grad=True, divergence="jsd", beta=0.01, **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_tiles(seed, backend, monkeypatch):
    """Chunk and block boundaries must not matter: force many of them per row."""
    monkeypatch.setattr(torch_rows, "CHUNK_ELEMENTS", 700)
    if backend != "torch":
        from topd_kernels.rows import triton_rows

        monkeypatch.setattr(triton_rows, "BLOCK_V_OVERRIDE", 128)
    problem = on_device(make_problem("batched", B=2, T=9, V=1000, dtype=torch.bfloat16, pad=(24, 0)))
    check_backend(backend, problem, teacher_grad=True, divergence="jsd", beta=BETA, reduction="none", **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_slices(seed, backend):
    """Logits that are column slices of wider tensors (a row stride, unit column stride)."""
    wide_s, wide_t = torch.randn(2, 15, 400, device=DEVICE), torch.randn(2, 15, 400, device=DEVICE)
    student, teacher = wide_s[..., 50:350], wide_t[..., 100:400]
    problem = dict(student=student, teacher=teacher, mask=torch.rand(2, 15, device=DEVICE) > 0.2,
                   cu_seqlens=None, vocab_size=None)
    check_backend(backend, problem, teacher_grad=True, **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("span", [(0, -1), (5, -1), (1, -2)])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_sliced_views_read_in_place(seed, backend, span, teacher_grad):
    """`logits[:, a:b]` (the causal shift, a prompt cut off) gives exactly what its contiguous copy gives,
    and the copy's result is checked against the reference; each base tensor that needs a gradient gets
    the view's gradient in its rows and exact zeros elsewhere."""
    base_s = torch.randn(3, 24, 301, device=DEVICE) * 3
    base_t = 0.6 * torch.randn(3, 24, 301, device=DEVICE) * 3 + 0.8 * base_s
    cut = slice(span[0], span[1])
    view_s, view_t = base_s[:, cut], base_t[:, cut]
    assert not view_s.is_contiguous()
    mask = torch.rand(view_s.shape[:2], device=DEVICE) > 0.2
    kwargs = dict(mask=mask, divergence="jsd", beta=BETA, reduction="none", **TOPD)
    copy_s = view_s.contiguous().requires_grad_(True)
    copy_t = view_t.contiguous().requires_grad_(teacher_grad)
    copy_loss, copy_stats = topd_kernels.fused_window_kl(copy_s, copy_t, backend=backend, return_stats=True,
                                                         **kwargs)
    leaf_s = base_s.clone().requires_grad_(True)
    leaf_t = base_t.clone().requires_grad_(teacher_grad)
    loss, stats = topd_kernels.fused_window_kl(leaf_s[:, cut], leaf_t[:, cut], backend=backend,
                                               return_stats=True, **kwargs)
    assert torch.equal(loss, copy_loss) and all(torch.equal(a, b) for a, b in zip(stats, copy_stats))
    upstream = torch.randn_like(loss)
    inputs = (leaf_s, leaf_t) if teacher_grad else (leaf_s,)
    copies = (copy_s, copy_t) if teacher_grad else (copy_s,)
    grads = torch.autograd.grad(loss, inputs, upstream)
    copy_grads = torch.autograd.grad(copy_loss, copies, upstream)
    outside = torch.ones(24, dtype=torch.bool)
    outside[cut] = False
    for grad, copy_grad in zip(grads, copy_grads):
        assert torch.equal(grad[:, cut], copy_grad)
        assert torch.equal(grad[:, outside], torch.zeros_like(grad[:, outside]))
    check_backend(backend, dict(student=view_s.contiguous(), teacher=view_t.contiguous(), mask=mask,
                                cu_seqlens=None, vocab_size=None), teacher_grad=teacher_grad,
                  **{k: v for k, v in kwargs.items() if k != "mask"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_that_keep_their_own_gradient(seed, backend):
    """Views whose rows share memory (an expanded teacher) or whose base needs no gradient get a gradient of
    their own, as any tensor: autograd takes it from there."""
    student_base = torch.randn(2, 9, 64, device=DEVICE, requires_grad=True)
    teacher_row = torch.randn(1, 9, 64, device=DEVICE, requires_grad=True)
    teacher = teacher_row.expand(2, 9, 64)
    loss = topd_kernels.fused_window_kl(student_base[:, :-1], teacher[:, :-1], backend=backend, **TOPD)
    grads = torch.autograd.grad(loss, (student_base, teacher_row))
    ref = window_kl_reference(student_base[:, :-1], teacher[:, :-1], **TOPD)
    ref_grads = torch.autograd.grad(ref, (student_base, teacher_row))
    for grad, ref_grad in zip(grads, ref_grads):
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_no_valid_position(backend, reduction):
    student = torch.randn(2, 5, 33, device=DEVICE).fill_(float("nan"))
    teacher = torch.randn(2, 5, 33, device=DEVICE)
    loss, stats, grad = run(backend, student, teacher, mask=torch.zeros(2, 5, dtype=torch.bool, device=DEVICE),
                            reduction=reduction, **TOPD)
    assert torch.equal(loss, torch.zeros_like(loss))
    for value in stats:
        assert not value.any()
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_give_exact_zeros(seed, backend):
    """Rows whose mask is False hold NaN: nothing of them reaches the loss, stats or gradients."""
    problem = on_device(make_problem("packed", V=211))
    loss, stats, grad = run(backend, problem["student"], problem["teacher"], mask=problem["mask"],
                            cu_seqlens=problem["cu_seqlens"], reduction="none", **TOPD)
    masked = ~problem["mask"]
    assert problem["student"][masked].isnan().any()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert not loss[masked].any() and not stats.kl[masked].any() and not grad[masked].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_functional(seed, backend):
    problem = on_device(make_problem("batched", V=64))
    module = topd_kernels.WindowKLLoss(backend=backend, **TOPD)
    expected = topd_kernels.fused_window_kl(problem["student"], problem["teacher"], mask=problem["mask"],
                                            backend=backend, **TOPD)
    assert torch.equal(module(problem["student"], problem["teacher"], mask=problem["mask"]), expected)
    assert "window=3" in repr(module)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_matches_torch_backend(seed, backend):
    """The kernels and the torch backend agree closely (both float32 inside)."""
    problem = on_device(make_problem("packed", V=503, dtype=torch.bfloat16))
    kwargs = dict(mask=problem["mask"], cu_seqlens=problem["cu_seqlens"], divergence="jsd", beta=BETA, **TOPD)
    ours, torch_ = (run(b, problem["student"], problem["teacher"], **kwargs) for b in (backend, "torch"))
    assert torch.allclose(ours[0], torch_[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours[1].kl, torch_[1].kl, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours[2].float(), torch_[2].float(), rtol=2 ** -7, atol=1e-6)


def test_nan_poisoning_is_active():
    assert torch.empty(3).isnan().all() and torch.empty_like(torch.zeros(2)).isnan().all()
