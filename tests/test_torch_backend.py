"""The torch backend against the float64 reference on fresh random inputs."""
import pytest
import torch

import topd_kernels
from topd_kernels import Quantile
from loss_cases import check_backend, make_problem

DIVERGENCES = ["reverse_kl", "forward_kl", "jsd"]
TOPD = dict(window=3, gamma=0.5, loss_threshold=Quantile(0.4), div_threshold=Quantile(0.5),
            suppress_weight=0.25, guidance_weight=0.8)


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_defaults_and_topd(seed, nan_poisoned_empty, layout, divergence, dtype):
    problem = make_problem(layout, dtype=dtype)
    check_backend("torch", problem, divergence=divergence, beta=0.3)
    check_backend("torch", problem, divergence=divergence, beta=0.3, **TOPD)


@pytest.mark.parametrize("window", [1, 3, 100])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_window_and_gamma(seed, window, gamma, layout):
    problem = make_problem(layout, T=63, V=97)
    check_backend("torch", problem, **{**TOPD, "window": window, "gamma": gamma})


@pytest.mark.parametrize("thresholds", [
    dict(loss_threshold=0.3, div_threshold=0.4),
    dict(loss_threshold=Quantile(0.0), div_threshold=Quantile(1.0)),
    dict(loss_threshold=None, div_threshold=Quantile(0.7)),
    dict(loss_threshold=Quantile(0.9), div_threshold=None),
])
@pytest.mark.parametrize("weights", [(0.0, 0.0), (1.0, 0.0), (0.4, 2.5)])
def test_thresholds_and_weights(seed, thresholds, weights):
    problem = make_problem("packed", V=211, scale=1.0)
    check_backend("torch", problem, window=4, gamma=0.8, suppress_weight=weights[0],
                  guidance_weight=weights[1], **thresholds)


@pytest.mark.parametrize("reduction,num_items", [
    ("mean", None), ("mean", 37.5), ("sum", None), ("batchmean", None), ("batchmean", 5), ("none", None)])
@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_reductions(seed, reduction, num_items, layout):
    problem = make_problem(layout, V=301)
    check_backend("torch", problem, reduction=reduction, num_items=num_items, **TOPD)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_temperature_and_teacher_grad(seed, divergence, temperature):
    problem = make_problem("batched", V=503)
    check_backend("torch", problem, teacher_grad=True, divergence=divergence, temperature=temperature,
                  reduction="none", **TOPD)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_mixed_dtypes_and_vocab_truncation(seed, nan_poisoned_empty, dtypes, divergence):
    problem = make_problem("packed", V=1271, dtype=dtypes[0], teacher_dtype=dtypes[1], pad=(9, 128))
    check_backend("torch", problem, teacher_grad=True, divergence=divergence, **TOPD)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_negative_infinity_logits(seed, divergence):
    problem = make_problem("batched", V=257, neg_inf=True)
    check_backend("torch", problem, teacher_grad=True, divergence=divergence, **TOPD)


def test_chunking_spans_many_chunks(seed, nan_poisoned_empty, monkeypatch):
    """Chunk boundaries must not matter: force tiny chunks."""
    monkeypatch.setattr(topd_kernels.torch_rows, "CHUNK_ELEMENTS", 700)
    problem = make_problem("packed", V=311, dtype=torch.bfloat16)
    check_backend("torch", problem, teacher_grad=True, divergence="jsd", **TOPD)


def test_non_contiguous_rows(seed):
    """Logits that are a column slice of a wider tensor (a row stride) give the same result."""
    wide_s, wide_t = torch.randn(2, 15, 400), torch.randn(2, 15, 400)
    student, teacher = wide_s[..., 50:350], wide_t[..., 100:400]
    assert not student.is_contiguous()
    problem = dict(student=student, teacher=teacher, mask=torch.rand(2, 15) > 0.2, cu_seqlens=None, vocab_size=None)
    check_backend("torch", problem, teacher_grad=True, **TOPD)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_no_valid_position(reduction):
    student = torch.randn(2, 5, 33, requires_grad=True)
    teacher = torch.randn(2, 5, 33)
    loss, stats = topd_kernels.fused_window_kl(student, teacher, mask=torch.zeros(2, 5, dtype=torch.bool),
                                               reduction=reduction, return_stats=True, backend="torch", **TOPD)
    assert torch.equal(loss, torch.zeros_like(loss))
    for value in stats:
        assert not value.any()
    loss.sum().backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_module_matches_functional(seed):
    problem = make_problem("batched", V=64)
    module = topd_kernels.WindowKLLoss(backend="torch", **TOPD)
    expected = topd_kernels.fused_window_kl(problem["student"], problem["teacher"], mask=problem["mask"],
                                            backend="torch", **TOPD)
    assert torch.equal(module(problem["student"], problem["teacher"], mask=problem["mask"]), expected)
    assert "window=3" in repr(module)


def test_nan_poisoning_is_active(nan_poisoned_empty):
    assert torch.empty(3).isnan().all() and torch.empty_like(torch.zeros(2)).isnan().all()
