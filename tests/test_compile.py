"""The loss traces into one graph under torch.compile (no host synchronisation, no data-dependent
Python branching) and gives the eager result, in both layouts."""
import pytest
import torch

import topd_kernels
from topd_kernels import Quantile

CONFIG = dict(window=3, loss_threshold=Quantile(0.5), div_threshold=Quantile(0.5), guidance_weight=0.5,
              suppress_weight=0.1, backend="torch")


@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_fullgraph_compile_matches_eager(seed, layout):
    shape = (2, 16) if layout == "batched" else (32,)
    cu_seqlens = None if layout == "batched" else torch.tensor([0, 5, 5, 20, 32])
    student = torch.randn(*shape, 64, requires_grad=True)
    teacher = torch.randn(*shape, 64)
    mask = torch.rand(shape) > 0.2

    def loss_fn(s, t, m, cu):
        return topd_kernels.fused_window_kl(s, t, mask=m, cu_seqlens=cu, **CONFIG)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher, mask, cu_seqlens)
    (grad,) = torch.autograd.grad(loss, student)
    eager = loss_fn(student, teacher, mask, cu_seqlens)
    (eager_grad,) = torch.autograd.grad(eager, student)
    assert torch.equal(loss, eager)
    assert torch.equal(grad, eager_grad)
