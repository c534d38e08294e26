"""The loss under torch.compile(fullgraph=True) and the row ops under torch.library.opcheck.

Every backend's row functions are torch.library ops with fake implementations, so a compiler traces the
whole loss as one graph: no host synchronisation, no data-dependent Python branching, no graph break at a
kernel launch. On the CPU this is checked with the torch backend and with the CUDA extension's backward op
(which runs its host build on CPU tensors), standing where it stands on a GPU; the GPU test compiles the
Triton and extension backends themselves.
"""
import pytest
import torch

import topd_kernels
from common import BACKENDS, BETA, DIVERGENCES, TOPD
from topd_kernels.rows import registry, torch_rows
from topd_kernels.rows.contract import RowOps, make_row_call, make_topk_call


def extension_ops():
    """torch forward + the extension's backward op: what "triton+cuda" is on a GPU, with a CPU forward."""
    from topd_kernels.rows import cuda_rows

    if cuda_rows.UNAVAILABLE:
        pytest.fail(f"the CUDA extension is not built: {cuda_rows.UNAVAILABLE}")
    return RowOps("torch+cuda", torch_rows.OPS.forward_op, cuda_rows.OPS.backward_op)


@pytest.fixture
def torch_cuda_backend(monkeypatch):
    """Registers "torch+cuda" (extension_ops) in the registry for the duration of a test."""
    backend = registry.Backend("torch+cuda", lambda: {"logits": extension_ops(), "topk": torch_rows.TOPK_OPS},
                               lambda: ("cpu", "cuda"))
    monkeypatch.setitem(registry.BACKENDS, "torch+cuda", backend)
    return "torch+cuda"


def problem(layout, V=64):
    shape = (2, 16) if layout == "batched" else (32,)
    cu_seqlens = None if layout == "batched" else torch.tensor([0, 5, 5, 20, 32])
    student = torch.randn(*shape, V, requires_grad=True)
    teacher = torch.randn(*shape, V, requires_grad=True)
    return student, teacher, torch.rand(shape) > 0.2, cu_seqlens


def compiled_matches_eager(backend, layout, **config):
    student, teacher, mask, cu_seqlens = problem(layout)

    def loss_fn(s, t, m, cu):
        return topd_kernels.fused_window_kl(s, t, mask=m, cu_seqlens=cu, backend=backend, **config)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher, mask, cu_seqlens)
    grads = torch.autograd.grad(loss, (student, teacher))
    eager = loss_fn(student, teacher, mask, cu_seqlens)
    eager_grads = torch.autograd.grad(eager, (student, teacher))
    assert torch.equal(loss, eager)
    for grad, eager_grad in zip(grads, eager_grads):
        assert torch.equal(grad, eager_grad)


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fullgraph_compile_matches_eager(seed, layout, backend):
    torch._dynamo.reset()
    compiled_matches_eager(backend, layout, **TOPD)


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fullgraph_compile_through_the_extension_op(seed, torch_cuda_backend, layout, divergence):
    torch._dynamo.reset()
    compiled_matches_eager(torch_cuda_backend, layout, divergence=divergence, beta=BETA, **TOPD)


def test_sliced_view_compiles(seed):
    torch._dynamo.reset()
    base = torch.randn(2, 17, 50, requires_grad=True)
    teacher = torch.randn(2, 16, 50)
    fn = torch.compile(lambda s: topd_kernels.fused_window_kl(s[:, :-1], teacher, backend="torch", **TOPD),
                       fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(base), topd_kernels.fused_window_kl(base[:, :-1], teacher, backend="torch", **TOPD))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_topk_teacher_compiles(seed, tail, layout):
    """A TopK teacher: its value checks become device-side assertions under the compiler, no graph break."""
    torch._dynamo.reset()
    student, teacher, mask, cu_seqlens = problem(layout)
    logprobs, ids = torch.log_softmax(teacher.detach(), -1).topk(5, dim=-1)

    def loss_fn(s, ids, logprobs, m, cu):
        return topd_kernels.fused_window_kl(s, topd_kernels.TopK(ids, logprobs, tail), mask=m, cu_seqlens=cu,
                                            backend="torch", **TOPD)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(student, ids, logprobs, mask, cu_seqlens)
    (grad,) = torch.autograd.grad(loss, student)
    eager = loss_fn(student, ids, logprobs, mask, cu_seqlens)
    (eager_grad,) = torch.autograd.grad(eager, student)
    assert torch.equal(loss, eager) and torch.equal(grad, eager_grad)


@pytest.mark.parametrize("tail", [0, 1])
def test_opcheck_torch_topk_ops(seed, tail):
    base = torch.randn(3, 9, 41)
    student = base[:, 1:-1, :37]
    logprobs, ids = torch.log_softmax(torch.randn(3, 7, 37), -1).topk(4, dim=-1)
    mask = torch.rand(21) > 0.3
    call = make_topk_call(student, logprobs, ids, 37, 0.7, 2, BETA, tail)
    stats = torch_rows.topk_forward(student, logprobs, ids, mask, call)
    coef = torch.where(mask, torch.rand(21), torch.zeros(21))
    grad_student = torch.empty(3, 8, 38)[:, :-1, :37]
    torch.library.opcheck(torch.ops.topd.torch_topk_forward, (student, logprobs, ids, mask, *call))
    torch.library.opcheck(torch.ops.topd.torch_topk_backward,
                          (student, logprobs, ids, stats, coef, *call, grad_student))


def row_op_args(V=37, want_teacher=True):
    """Arguments of the forward and backward row ops: strided (B, T, V) rows, strided gradient rows."""
    base = torch.randn(3, 9, V + 4)
    student, teacher = base[:, 1:-1, :V], torch.randn(3, 7, V, dtype=torch.bfloat16)
    mask = torch.rand(21) > 0.3
    call = make_row_call(student, teacher, V, 0.7, 2, BETA)
    stats = torch_rows.row_forward(student, teacher, mask, call)
    coef = torch.where(mask, torch.rand(21), torch.zeros(21))
    grad_student = torch.empty(3, 8, V + 1)[:, :-1, :V]
    grad_teacher = torch.empty_like(teacher) if want_teacher else None
    return (student, teacher, mask, *call), (student, teacher, stats, coef, *call, grad_student, grad_teacher)


@pytest.mark.parametrize("want_teacher", [True, False])
def test_opcheck_torch_ops(seed, want_teacher):
    forward_args, backward_args = row_op_args(want_teacher=want_teacher)
    torch.library.opcheck(torch.ops.topd.torch_row_forward, forward_args)
    torch.library.opcheck(torch.ops.topd.torch_row_backward, backward_args)


@pytest.mark.parametrize("want_teacher", [True, False])
def test_opcheck_extension_op(seed, want_teacher):
    extension_ops()
    _, backward_args = row_op_args(want_teacher=want_teacher)
    torch.library.opcheck(torch.ops.topd.cuda_row_backward, backward_args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_gpu_fullgraph_compile(seed, backend, layout):
    """The Triton and extension backends compile (Inductor) on a GPU and match eager closely."""
    torch._dynamo.reset()
    student, teacher, mask, cu_seqlens = (x.cuda() if x is not None else None for x in problem(layout, V=1000))
    student = student.detach().requires_grad_(True)

    def loss_fn(s, t, m, cu):
        return topd_kernels.fused_window_kl(s, t, mask=m, cu_seqlens=cu, backend=backend, **TOPD)

    loss = torch.compile(loss_fn, fullgraph=True)(student, teacher, mask, cu_seqlens)
    (grad,) = torch.autograd.grad(loss, student)
    eager = loss_fn(student, teacher, mask, cu_seqlens)
    (eager_grad,) = torch.autograd.grad(eager, student)
    assert torch.allclose(loss, eager, rtol=1e-6, atol=1e-7)
    assert torch.allclose(grad, eager_grad, rtol=1e-6, atol=1e-8)
