"""A teacher given as top-k log-probabilities (`topd_kernels.TopK`, SPEC "Top-k teacher"), end to end on every
backend against the float64 reference: `loss_cases.check_backend` compares the loss, every statistic and the
student's gradient (random upstream gradients for reduction="none", the three-way precision check, inputs
unchanged), with NaN-poisoned allocations."""
import pytest
import torch

import topd_kernels
from common import BACKENDS, BETA, DEVICE, DIVERGENCES, TOPD
from loss_cases import check_backend, make_topk_problem
from topd_kernels import TopK
from topd_kernels.reference import topk_divergence, window_kl_reference
from topd_kernels.rows import torch_rows

TAILS = ("bucket", "renormalize")


@pytest.fixture(autouse=True)
def poisoned(nan_poisoned_empty):
    """torch.empty / empty_like return NaN-filled tensors during every test of this module."""


def on_device(problem):
    def move(value):
        if isinstance(value, TopK):
            return TopK(value.token_ids.to(DEVICE), value.logprobs.to(DEVICE), value.tail)
        return value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    return {key: move(value) for key, value in problem.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_defaults_and_topd(seed, backend, tail, layout, divergence, dtype):
    problem = on_device(make_topk_problem(32, tail, layout=layout, dtype=dtype))
    check_backend(backend, problem, divergence=divergence, beta=BETA)
    check_backend(backend, problem, divergence=divergence, beta=BETA, reduction="none", **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [1, 4, 128])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_slot_counts(seed, backend, tail, k, ids_dtype):
    """k = 1 (a single slot: renormalize has nothing to compare), 4 and 128, int32 and int64 ids, a bfloat16
    log-probability tensor, temperature (the student's only)."""
    problem = on_device(make_topk_problem(k, tail, ids_dtype=ids_dtype, logprob_dtype=torch.bfloat16,
                                          layout="packed", V=1271))
    knobs = dict(TOPD)
    if k == 1 and tail == "renormalize":  # one category a side: every d is 0 (thresholds would rank rounding)
        knobs.update(loss_threshold=None, div_threshold=None)
    loss, _ = check_backend(backend, problem, divergence="jsd", beta=BETA, temperature=0.7, reduction="none",
                            **knobs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_vocab_truncation_and_awkward_shapes(seed, backend, tail, divergence):
    """Vocabulary 1271 read from student rows padded with garbage, T = 63, a window longer than the sequence."""
    problem = on_device(make_topk_problem(4, tail, layout="batched", B=2, T=63, V=1271, pad=(9, 0),
                                          dtype=torch.bfloat16))
    check_backend(backend, problem, divergence=divergence, beta=BETA, **{**TOPD, "window": 100})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equal_to_vocabulary_is_the_full_divergence(seed, backend, tail, divergence):
    """With every id a slot, both tails give the full-vocabulary divergence of the teacher's logits."""
    V = 211
    student = torch.randn(2, 9, V, device=DEVICE) * 3
    teacher = 0.6 * torch.randn(2, 9, V, device=DEVICE) * 3 + 0.8 * student
    logprobs, ids = torch.log_softmax(teacher.double(), -1).float().topk(V, dim=-1)
    kwargs = dict(divergence=divergence, beta=BETA, reduction="none", **TOPD)
    full, full_stats = window_kl_reference(student, teacher, return_stats=True, **kwargs)
    ours, stats = topd_kernels.fused_window_kl(student, TopK(ids, logprobs, tail), backend=backend,
                                               return_stats=True, **kwargs)
    assert torch.allclose(stats.kl.double(), full_stats.kl, rtol=1e-4, atol=2e-6)
    assert torch.allclose(ours.double(), full, rtol=1e-4, atol=2e-6)
    problem = dict(student=student, teacher=TopK(ids, logprobs, tail), mask=torch.ones(2, 9, dtype=torch.bool,
                   device=DEVICE), cu_seqlens=None, vocab_size=None)
    check_backend(backend, problem, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_tail_of_nearly_all_mass(seed, backend, divergence):
    """Slots holding all but 2e-6 .. 1.3e-4 of the student's mass (and most of the teacher's): the tail
    (1 - sum p, which cancels) keeps loss, statistics and gradient within the bounds of the other tests."""
    V, k = 1271, 32
    problem = make_topk_problem(k, "bucket", layout="batched", B=2, T=11, V=V, masked_sequence=False, padding=0.0)
    top = problem["teacher"]
    student = problem["student"].double()
    in_top = torch.zeros(2, 11, V, dtype=torch.bool).scatter_(-1, top.token_ids, True)
    rest = torch.logsumexp(student.masked_fill(in_top, float("-inf")), -1, keepdim=True)
    slots = torch.logsumexp(student.masked_fill(~in_top, float("-inf")), -1, keepdim=True)
    student = torch.where(in_top, student + (rest - slots + torch.empty(2, 11, 1).uniform_(9.0, 13.0)), student)
    student = student.float()  # the slots now carry all but e^-9 .. e^-13 of p_s
    logprobs = torch.log_softmax(student.double() * 0.9 + torch.randn(2, 11, V), -1).gather(-1, top.token_ids)
    tail = 1 - torch.log_softmax(student.double(), -1).gather(-1, top.token_ids).exp().sum(-1)
    assert 1e-6 < tail.min() and tail.max() < 2e-4
    problem.update(student=student, teacher=TopK(top.token_ids, logprobs.float(), "bucket"))
    check_backend(backend, on_device(problem), divergence=divergence, beta=BETA, reduction="none", **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_rows_without_slots_and_masked_rows(seed, backend, tail):
    """Rows whose slots are all padding have d = 0 and a zero gradient; masked rows hold NaN everywhere."""
    problem = make_topk_problem(8, tail, layout="packed", V=301)
    problem["teacher"].logprobs[3:6] = float("-inf")
    problem = on_device(problem)
    loss, _ = check_backend(backend, problem, reduction="none", **TOPD)
    assert not loss[3:6].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_tiles(seed, backend, monkeypatch):
    """Chunk and block boundaries must not matter: force many of them per row."""
    monkeypatch.setattr(torch_rows, "CHUNK_ELEMENTS", 700)
    if backend != "torch":
        from topd_kernels.rows import triton_rows

        monkeypatch.setattr(triton_rows, "BLOCK_V_OVERRIDE", 128)
    problem = on_device(make_topk_problem(16, "bucket", layout="batched", B=2, T=9, V=1000, dtype=torch.bfloat16,
                                          pad=(24, 0)))
    check_backend(backend, problem, divergence="jsd", beta=BETA, reduction="none", **TOPD)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_student_and_teacher_views(seed, backend):
    """`logits[:, :-1]` with the matching slice of the top-k tensors: read in place, the gradient written into
    the rows of the base's gradient, exactly what contiguous copies give."""
    base = torch.randn(2, 12, 301, device=DEVICE) * 3
    logprobs, ids = torch.log_softmax(torch.randn(2, 12, 301, device=DEVICE) * 3, -1).topk(8, dim=-1)
    leaf = base.clone().requires_grad_(True)
    copy = base[:, :-1].contiguous().requires_grad_(True)
    kwargs = dict(backend=backend, reduction="none", **TOPD)
    loss = topd_kernels.fused_window_kl(leaf[:, :-1], TopK(ids[:, :-1], logprobs[:, :-1]), **kwargs)
    copy_loss = topd_kernels.fused_window_kl(copy, TopK(ids[:, :-1].contiguous(), logprobs[:, :-1].contiguous()),
                                             **kwargs)
    assert torch.equal(loss, copy_loss)
    upstream = torch.randn_like(loss)
    (grad,), (copy_grad,) = torch.autograd.grad(loss, leaf, upstream), torch.autograd.grad(copy_loss, copy, upstream)
    assert torch.equal(grad[:, :-1], copy_grad) and not grad[:, -1].any()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradcheck(tail, divergence):
    torch.manual_seed(0)
    student = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    logprobs, ids = torch.log_softmax(torch.randn(2, 4, 9, dtype=torch.float64), -1).topk(3, dim=-1)
    logprobs[0, 1, 0] = float("-inf")
    teacher = TopK(ids, logprobs, tail)
    assert torch.autograd.gradcheck(
        lambda x: window_kl_reference(x, teacher, divergence=divergence, beta=BETA, temperature=0.8,
                                      reduction="sum", **TOPD), (student,))


def test_reference_categories_by_hand():
    """Three-category bucket reverse KL written out: two slots and the tail."""
    z = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
    p = z.softmax(-1)[0]
    q = torch.tensor([0.5, 0.3], dtype=torch.float64)
    ids = torch.tensor([[1, 2]])
    P = torch.stack((p[1], p[2], 1 - p[1] - p[2]))
    Q = torch.stack((q[0], q[1], 1 - q.sum()))
    expected = (P * (P / Q).log()).sum()
    d = topk_divergence(z, TopK(ids, q.log()[None]), "reverse_kl", 0.5, 1.0)
    assert torch.allclose(d, expected[None], rtol=1e-13)
    renormalized = (P[:2] / P[:2].sum() * ((P[:2] / P[:2].sum()) / (Q[:2] / Q[:2].sum())).log()).sum()
    d = topk_divergence(z, TopK(ids, q.log()[None], "renormalize"), "reverse_kl", 0.5, 1.0)
    assert torch.allclose(d, renormalized[None], rtol=1e-13)


def test_tail_floor_passes_no_gradient():
    """The student's tail floored at 1e-7 (its slots hold everything): the gradient is that of the slots alone."""
    z = torch.tensor([[30.0, 0.0, 29.0]], dtype=torch.float64, requires_grad=True)
    logprobs = torch.tensor([[-0.4, -1.2]], dtype=torch.float64)
    ids = torch.tensor([[0, 2]])
    d = topk_divergence(z, TopK(ids, logprobs), "reverse_kl", 0.5, 1.0)
    (grad,) = torch.autograd.grad(d.sum(), z)
    # With the floor active, d = sum_j P_j log(P_j / Q_j) + const: dd/da_v = sum_j (log P_j - log Q_j + 1) dP_j/da_v.
    log_p = torch.log_softmax(z.detach(), -1)[0]
    p = log_p.exp()
    g = torch.zeros(3, dtype=torch.float64)
    for j, i in enumerate(ids[0].tolist()):
        g_j = log_p[i] - logprobs[0, j] + 1
        g += g_j * p[i] * (torch.eye(3, dtype=torch.float64)[i] - p)
    assert torch.allclose(grad[0], g, rtol=1e-10, atol=1e-15)
    for backend in BACKENDS:
        x = z.detach().float().to(DEVICE).requires_grad_(True)
        loss = topd_kernels.fused_window_kl(x, TopK(ids.to(DEVICE), logprobs.float().to(DEVICE)), backend=backend,
                                            window=1)
        (ours,) = torch.autograd.grad(loss, x)
        assert torch.allclose(ours.double().cpu(), g[None], rtol=1e-4, atol=1e-7), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("outside", [1e-30, 3e-8, 1e-5])
def test_student_mass_outside_the_slots(seed, backend, divergence, outside):
    """The student's mass outside the slots is ~0, near the 1e-7 floor, or 1e-5, while the teacher keeps 10% in
    its tail (forward_kl multiplies any error of the student's tail by Q_tail / P_tail): the tail is summed over
    the other columns, never 1 - sum p, so the floor's test and every output match the float64 reference."""
    V, k = 400, 8
    ids = torch.stack([torch.randperm(V)[:k] for _ in range(2 * 6)]).reshape(2, 6, k)
    in_top = torch.zeros(2, 6, V, dtype=torch.bool).scatter_(-1, ids, True)
    z = torch.randn(2, 6, V, dtype=torch.float64)
    rest = torch.logsumexp(z.masked_fill(in_top, float("-inf")), -1, keepdim=True)
    slots = torch.logsumexp(z.masked_fill(~in_top, float("-inf")), -1, keepdim=True)
    student = torch.where(in_top, z + rest - slots - torch.log(torch.tensor(outside, dtype=torch.float64)), z).float()
    logprobs = torch.log_softmax(torch.randn(2, 6, k), -1) + torch.log(torch.tensor(0.9))
    problem = dict(student=student, teacher=TopK(ids, logprobs), mask=torch.ones(2, 6, dtype=torch.bool),
                   cu_seqlens=None, vocab_size=None)
    check_backend(backend, on_device(problem), divergence=divergence, beta=BETA, reduction="none", window=1)
