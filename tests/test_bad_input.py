"""Every bad input of SPEC "Bad input" is a ValueError / TypeError naming the argument, before any work."""
import pytest
import torch

import topd_kernels
from topd_kernels import Quantile, fused_window_kl
from topd_kernels.reference import window_kl_reference

S = torch.randn(2, 4, 10)
T = torch.randn(2, 4, 10)
P = torch.randn(6, 10)  # packed


CASES = [
    # (error, argument named in the message, positional tensors, keyword arguments)
    (ValueError, "student_logits", (torch.randn(10), torch.randn(10)), {}),
    (ValueError, "student_logits", (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)), {}),
    (ValueError, "teacher_logits", (S, torch.randn(2, 5, 10)), {}),
    (ValueError, "vocab_size", (S, torch.randn(2, 4, 12)), {}),
    (ValueError, "vocab_size", (S, torch.randn(2, 4, 12)), dict(vocab_size=11)),
    (ValueError, "vocab_size", (S, T), dict(vocab_size=0)),
    (TypeError, "student_logits", (torch.ones(2, 4, 10, dtype=torch.int64), T), {}),
    (TypeError, "teacher_logits", (S, torch.ones(2, 4, 10, dtype=torch.int32)), {}),
    (TypeError, "student_logits", (S.tolist(), T), {}),
    (ValueError, "mask", (S, T), dict(mask=torch.ones(2, 5, dtype=torch.bool))),
    (TypeError, "mask", (S, T), dict(mask=torch.ones(2, 4))),
    (ValueError, "cu_seqlens", (S, T), dict(cu_seqlens=torch.tensor([0, 4, 8]))),
    (ValueError, "cu_seqlens", (P, P), dict(cu_seqlens=torch.tensor([1, 3, 6]))),
    (ValueError, "cu_seqlens", (P, P), dict(cu_seqlens=torch.tensor([0, 4, 3, 6]))),
    (ValueError, "cu_seqlens", (P, P), dict(cu_seqlens=torch.tensor([0, 3, 5]))),
    (ValueError, "cu_seqlens", (P, P), dict(cu_seqlens=torch.tensor([0.0, 6.0]))),
    (ValueError, "window", (S, T), dict(window=0)),
    (TypeError, "window", (S, T), dict(window=2.5)),
    (ValueError, "gamma", (S, T), dict(gamma=1.5)),
    (ValueError, "gamma", (S, T), dict(gamma=-0.1)),
    (ValueError, "temperature", (S, T), dict(temperature=0.0)),
    (ValueError, "temperature", (S, T), dict(temperature=float("nan"))),
    (ValueError, "beta", (S, T), dict(divergence="jsd", beta=1.0)),
    (ValueError, "beta", (S, T), dict(divergence="jsd", beta=0.0)),
    (ValueError, "suppress_weight", (S, T), dict(suppress_weight=1.5)),
    (ValueError, "guidance_weight", (S, T), dict(guidance_weight=-1.0)),
    (ValueError, "num_items", (S, T), dict(reduction="sum", num_items=4)),
    (ValueError, "num_items", (S, T), dict(reduction="none", num_items=4)),
    (ValueError, "num_items", (S, T), dict(num_items=0)),
    (ValueError, "divergence", (S, T), dict(divergence="kl")),
    (ValueError, "reduction", (S, T), dict(reduction="avg")),
    (ValueError, "backend", (S, T), dict(backend="cudnn")),
    (TypeError, "loss_threshold", (S, T), dict(loss_threshold="high")),
]


PARAMS = [pytest.param(fused_window_kl, *case, id=f"fused-{case[1]}-{i}") for i, case in enumerate(CASES)] + [
    pytest.param(window_kl_reference, *case, id=f"reference-{case[1]}-{i}")
    for i, case in enumerate(CASES) if case[1] != "backend"  # the reference ignores `backend`
]


@pytest.mark.parametrize("fn,error,argument,tensors,kwargs", PARAMS)
def test_bad_input_names_the_argument(fn, error, argument, tensors, kwargs):
    with pytest.raises(error, match=argument):
        fn(*tensors, **kwargs)


@pytest.mark.parametrize("q", [-0.1, 1.5])
def test_quantile_outside_unit_interval(q):
    with pytest.raises(ValueError, match="q must be in"):
        Quantile(q)


def test_mismatched_devices():
    meta = torch.randn(2, 4, 10, device="meta")
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_window_kl(S, meta)


@pytest.mark.parametrize("backend", ["triton", "triton+cuda"])
def test_kernel_backends_on_plain_cpu_are_an_error(monkeypatch, backend):
    """Without the interpreter, the kernel backends cannot take CPU tensors: an error, never a fallback."""
    from topd_kernels.rows import triton_rows

    monkeypatch.setattr(triton_rows, "INTERPRETED", False)
    with pytest.raises(ValueError, match="backend"):
        fused_window_kl(S, T, backend=backend)


def test_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match="loss_q"):
        fused_window_kl(S, T, loss_q=0.5)
    with pytest.raises(TypeError, match="loss_q"):
        topd_kernels.WindowKLLoss(loss_q=0.5)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="window"):
        topd_kernels.WindowKLLoss(window=0)
