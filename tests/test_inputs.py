"""The input conveniences trainers need (SPEC "Inputs"): integer masks, `labels=` with the causal shift, packed
`(1, N, V)` logits, `cu_seqlens` as a list, `cu_seqlens_from_position_ids`, `num_items` as a 0-d tensor."""
import pytest
import torch

import topd_kernels
from common import BACKENDS, TOPD
from topd_kernels import cu_seqlens_from_position_ids, fused_window_kl
from topd_kernels.reference import window_kl_reference


def logits(*shape, V=53):
    student = torch.randn(*shape, V) * 2
    return student, 0.6 * torch.randn(*shape, V) * 2 + 0.8 * student


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_mask_is_nonzero(seed, backend, dtype):
    student, teacher = logits(2, 9)
    mask = (torch.rand(2, 9) > 0.3)
    as_int = mask.to(dtype) * torch.randint(1, 3, (2, 9), dtype=dtype)  # any nonzero value is valid
    expected = fused_window_kl(student, teacher, mask=mask, backend=backend, reduction="none", **TOPD)
    assert torch.equal(fused_window_kl(student, teacher, mask=as_int, backend=backend, reduction="none", **TOPD),
                       expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_are_the_causal_shift(seed, backend):
    """labels (B, T) with -100: position t counts when labels[t + 1] is not ignored; the same as the shifted view
    `logits[:, :-1]` with the mask `labels[:, 1:] != -100`, per token, in the mean, and in the gradient."""
    student, teacher = logits(3, 12)
    labels = torch.randint(0, 53, (3, 12))
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    x = student.clone().requires_grad_(True)
    loss, stats = fused_window_kl(x, teacher, labels=labels, backend=backend, return_stats=True, **TOPD)
    (grad,) = torch.autograd.grad(loss, x)
    y = student.clone().requires_grad_(True)
    shifted, shifted_stats = fused_window_kl(y[:, :-1], teacher[:, :-1], mask=labels[:, 1:] != -100,
                                             backend=backend, return_stats=True, **TOPD)
    (shifted_grad,) = torch.autograd.grad(shifted, y)
    assert torch.allclose(loss, shifted, rtol=1e-6, atol=1e-7)
    assert torch.allclose(grad, shifted_grad, rtol=1e-6, atol=1e-8)
    assert torch.allclose(stats.kl[:, :-1], shifted_stats.kl) and not stats.kl[:, -1].any()
    assert torch.equal(stats.divergent[:, :-1], shifted_stats.divergent)
    ref = window_kl_reference(student, teacher, labels=labels, **TOPD)
    assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=1e-7)


def test_labels_in_the_packed_layout(seed):
    """Packed: each sequence's last position never counts, whatever its neighbour's label."""
    student, teacher = logits(10)
    labels = torch.arange(10)
    cu = [0, 3, 3, 7, 10]
    stats = fused_window_kl(student, teacher, labels=labels, cu_seqlens=cu, return_stats=True, window=1)[1]
    valid = stats.weight > 0
    assert valid.tolist() == [True, True, False, True, True, True, False, True, True, False]


@pytest.mark.parametrize("fn", [fused_window_kl, window_kl_reference])
def test_labels_bad_input(fn):
    student, teacher = logits(2, 5)
    labels = torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="labels"):
        fn(student, teacher, labels=labels, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="labels"):
        fn(student, teacher, labels=labels.float())
    with pytest.raises(ValueError, match="labels"):
        fn(student, teacher, labels=labels[:, :4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_logits_with_a_unit_batch(seed, backend):
    """HF's packed batches are (1, N, V) with cu_seqlens: the same as (N, V), outputs in the (1, N) layout."""
    student, teacher = logits(17)
    cu = torch.tensor([0, 5, 11, 17])
    mask = torch.rand(17) > 0.2
    kwargs = dict(backend=backend, reduction="none", return_stats=True, **TOPD)
    flat, flat_stats = fused_window_kl(student, teacher, mask=mask, cu_seqlens=cu, **kwargs)
    unit, unit_stats = fused_window_kl(student[None], teacher[None], mask=mask[None], cu_seqlens=cu, **kwargs)
    assert unit.shape == (1, 17) and torch.equal(unit[0], flat)
    assert all(torch.equal(a[0], b) for a, b in zip(unit_stats, flat_stats))
    batchmean = fused_window_kl(student[None], teacher[None], cu_seqlens=cu, backend=backend, reduction="batchmean")
    assert torch.allclose(batchmean, fused_window_kl(student, teacher, cu_seqlens=cu, backend=backend,
                                                     reduction="sum") / 3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_window_kl(torch.stack((student, student)), torch.stack((teacher, teacher)), cu_seqlens=cu)


@pytest.mark.parametrize("form", [list, tuple])
def test_cu_seqlens_as_a_list(seed, form):
    student, teacher = logits(12)
    expected = fused_window_kl(student, teacher, cu_seqlens=torch.tensor([0, 4, 12]), **TOPD)
    assert torch.equal(fused_window_kl(student, teacher, cu_seqlens=form([0, 4, 12]), **TOPD), expected)
    for bad in ([1, 12], [0, 8, 4, 12], [0, 11], [0, 4.0, 12]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            fused_window_kl(student, teacher, cu_seqlens=form(bad))


def test_cu_seqlens_from_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(position_ids).tolist() == [0, 3, 5, 6, 10]
    assert cu_seqlens_from_position_ids(position_ids[0]).tolist() == [0, 3, 5, 6, 10]
    assert cu_seqlens_from_position_ids(torch.arange(4)).tolist() == [0, 4]
    for bad in (torch.tensor([1, 2, 0]), torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3), torch.zeros(0)):
        with pytest.raises(ValueError, match="position_ids"):
            cu_seqlens_from_position_ids(bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_num_items_as_a_tensor(seed, backend, reduction):
    student, teacher = logits(2, 9)
    x, y = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    as_number = fused_window_kl(x, teacher, num_items=37, reduction=reduction, backend=backend, **TOPD)
    as_tensor = fused_window_kl(y, teacher, num_items=torch.tensor(37), reduction=reduction, backend=backend, **TOPD)
    assert torch.equal(as_number, as_tensor)
    assert torch.equal(torch.autograd.grad(as_number, x)[0], torch.autograd.grad(as_tensor, y)[0])
    ref = window_kl_reference(student, teacher, num_items=torch.tensor(37.0), reduction=reduction, **TOPD)
    assert torch.allclose(as_tensor.double(), ref, rtol=1e-5)


def test_num_items_tensor_bad_input():
    student, teacher = logits(2, 4)
    with pytest.raises(TypeError, match="num_items"):
        fused_window_kl(student, teacher, num_items=torch.tensor([3.0]))
    with pytest.raises(ValueError, match="num_items"):
        fused_window_kl(student, teacher, num_items=torch.tensor(0.0))
    with pytest.raises(ValueError, match="num_items"):
        fused_window_kl(student, teacher, num_items=torch.tensor(3.0), reduction="sum")


def test_num_items_tensor_compiles(seed):
    """A 0-d tensor num_items (a trainer's num_items_in_batch) traces without a graph break or host read."""
    torch._dynamo.reset()
    student, teacher = logits(2, 9)
    student.requires_grad_(True)
    fn = torch.compile(lambda s, t, n: fused_window_kl(s, t, num_items=n, backend="torch", **TOPD),
                       fullgraph=True, backend="aot_eager")
    for count in (11, 23):
        n = torch.tensor(count)
        assert torch.allclose(fn(student, teacher, n), fused_window_kl(student, teacher, num_items=count,
                                                                       backend="torch", **TOPD))


def test_module_takes_labels_and_num_items(seed):
    student, teacher = logits(2, 9)
    labels = torch.randint(0, 53, (2, 9))
    module = topd_kernels.WindowKLLoss(**TOPD)
    expected = fused_window_kl(student, teacher, labels=labels, num_items=torch.tensor(5), **TOPD)
    assert torch.equal(module(student, teacher, labels=labels, num_items=torch.tensor(5)), expected)
