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


# ---------------------------------------------------------------------------------------------------
# A top-k teacher (SPEC "Bad input", "Input forms")
# ---------------------------------------------------------------------------------------------------
IDS = torch.tensor([[[1, 4, 7]] * 4] * 2)  # (2, 4, 3)
LOGPROBS = torch.log(torch.tensor([[[0.5, 0.2, 0.1]] * 4] * 2))


def _with(ids=None, logprobs=None, row=(0, 1), slot=1):
    """IDS / LOGPROBS with one slot of one row changed."""
    ids_, logprobs_ = IDS.clone(), LOGPROBS.clone()
    if ids is not None:
        ids_[row][slot] = ids
    if logprobs is not None:
        logprobs_[row][slot] = logprobs
    return ids_, logprobs_


TOPK_CASES = [
    # (error, text in the message, call)
    (TypeError, "TopK can only be the teacher", lambda f: f(topd_kernels.TopK(IDS, LOGPROBS), T)),
    (TypeError, "token_ids", lambda f: f(S, topd_kernels.TopK(IDS.float(), LOGPROBS))),
    (TypeError, "logprobs", lambda f: f(S, topd_kernels.TopK(IDS, LOGPROBS.to(torch.int64)))),
    (ValueError, "one shape", lambda f: f(S, topd_kernels.TopK(IDS[..., :2], LOGPROBS))),
    (ValueError, "teacher_logits", lambda f: f(S, topd_kernels.TopK(IDS[:, :3], LOGPROBS[:, :3]))),
    (ValueError, "teacher_logits", lambda f: f(P, topd_kernels.TopK(IDS, LOGPROBS))),
    (ValueError, "k = 11", lambda f: f(S, topd_kernels.TopK(torch.arange(11).expand(2, 4, 11),
                                                          torch.full((2, 4, 11), -5.0)))),
    (ValueError, "k = 3", lambda f: f(S, topd_kernels.TopK(IDS, LOGPROBS), vocab_size=2)),
    (ValueError, "outside", lambda f: f(S, topd_kernels.TopK(*_with(ids=10)))),
    (ValueError, "outside", lambda f: f(S, topd_kernels.TopK(*_with(ids=-1)))),
    (ValueError, "outside", lambda f: f(S, topd_kernels.TopK(*_with(ids=8)), vocab_size=8)),
    (ValueError, "repeated", lambda f: f(S, topd_kernels.TopK(*_with(ids=7)))),
    (ValueError, "sum to", lambda f: f(S, topd_kernels.TopK(*_with(logprobs=-0.5)))),
    (ValueError, "tail", lambda f: f(S, topd_kernels.TopK(IDS, LOGPROBS, tail="drop"))),
    (ValueError, "require grad", lambda f: f(S, topd_kernels.TopK(IDS, LOGPROBS.clone().requires_grad_(True)))),
    (ValueError, "k \\(the last dim\\)", lambda f: f(S, topd_kernels.TopK(IDS[..., :0], LOGPROBS[..., :0]))),
]


@pytest.mark.parametrize("fn", [fused_window_kl, window_kl_reference], ids=["fused", "reference"])
@pytest.mark.parametrize("error,text,call", TOPK_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(TOPK_CASES)])
def test_bad_topk_teacher(fn, error, text, call):
    with pytest.raises(error, match=text):
        call(fn)


def test_topk_padding_slots_are_not_checked():
    """A padding slot (-inf) may repeat an id or hold one out of range; probabilities up to 1 + 1e-3 pass."""
    ids, logprobs = _with(ids=99, logprobs=float("-inf"))
    ids[0, 2, 2], logprobs[0, 2, 2] = 1, float("-inf")
    fused_window_kl(S, topd_kernels.TopK(ids, logprobs))
    almost = torch.log(torch.tensor([0.6, 0.3, 0.1005])).expand(2, 4, 3)
    fused_window_kl(S, topd_kernels.TopK(IDS, almost))


def test_topk_with_vocabulary_parallel_group_is_an_error(monkeypatch):
    from topd_kernels.rows import vocab_parallel

    monkeypatch.setattr(vocab_parallel, "group_size", lambda group: 2)
    with pytest.raises(ValueError, match="vocab_parallel_group"):
        fused_window_kl(S, topd_kernels.TopK(IDS, LOGPROBS), vocab_parallel_group=object())
