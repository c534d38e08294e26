"""Shared test machinery: random problems and the comparison of a backend against the float64 reference.

`make_problem` draws fresh inputs in either layout, with awkward extras on request (fully masked
sequences whose logits are NaN, -inf entries, padded vocabularies, mixed dtypes). `check_backend`
runs `fused_window_kl` and `window_kl_reference` on it and compares the loss, both gradients (with a
random upstream gradient for reduction="none") and every statistic, and checks the inputs are unchanged.

Precision model (a three-way check): the truth is the float64 reference; "plain" is the same reference
formula evaluated by PyTorch at the inputs' dtype. The backend computes in float32, so its error must
be within float32 accuracy of the truth for the loss and statistics, and its gradient within one unit
of the gradient dtype's precision (the output rounding) — and never more than a small multiple of
plain PyTorch's error at that dtype.
"""
from __future__ import annotations

import math

import torch

import topd_kernels
from topd_kernels import TopK
from topd_kernels.reference import window_kl_reference

FP32_RTOL = 2e-5  # float32 accumulation over a vocabulary row
ULP = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def make_problem(layout="batched", B=3, T=21, V=1271, dtype=torch.float32, teacher_dtype=None, pad=(0, 0),
                 masked_sequence=True, mask_rate=0.15, neg_inf=False, scale=3.0, lengths=(7, 0, 1, 19, 12),
                 offset=0.0):
    """Fresh random inputs. pad: extra (student, teacher) vocabulary columns beyond V (garbage);
    offset: added to every logit of both models (a large common offset, e.g. 1e4, tests precision)."""
    teacher_dtype = teacher_dtype or dtype
    if layout == "batched":
        shape = (B, T)
        cu_seqlens = None
    else:
        shape = (sum(lengths),)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    student = torch.randn(*shape, V + pad[0]) * scale
    teacher = torch.randn(*shape, V + pad[1]) * scale
    teacher[..., :V] = 0.6 * teacher[..., :V] + 0.8 * student[..., :V]  # correlated, like a real teacher
    student[..., :V] += offset
    teacher[..., :V] += offset
    student[..., V:] = 1e4
    teacher[..., V:] = -1e4
    mask = torch.rand(shape) > mask_rate
    if masked_sequence:
        if layout == "batched":
            mask[1] = False
            student[1], teacher[1] = float("nan"), float("nan")
        else:
            start, length = lengths[0], lengths[1] + lengths[2] + lengths[3]
            mask[start:start + length] = False
            student[start:start + length] = float("nan")
            teacher[start:start + length] = float("nan")
    if neg_inf:
        columns = torch.randperm(V)[: max(1, V // 10)]
        student[..., columns] = float("-inf")
        teacher[..., columns] = float("-inf")
    return dict(student=student.to(dtype), teacher=teacher.to(teacher_dtype), mask=mask, cu_seqlens=cu_seqlens,
                vocab_size=V if pad != (0, 0) else None)


def make_topk_problem(k, tail="bucket", ids_dtype=torch.int64, logprob_dtype=torch.float32, padding=0.2,
                      **problem_kwargs):
    """A problem whose teacher is a TopK: the top-k of the teacher's float64 log-softmax over the first V
    columns, in shuffled slot order, with about `padding` of the slots turned into padding (-inf, with ids
    that are garbage: repeated or out of range). Masked rows keep NaN log-probabilities."""
    problem = make_problem(**problem_kwargs)
    teacher = problem["teacher"]
    V = problem["vocab_size"] or teacher.shape[-1]
    logprobs, ids = torch.log_softmax(teacher[..., :V].double(), -1).topk(k, dim=-1)
    order = torch.rand(ids.shape).argsort(-1)
    logprobs, ids = logprobs.gather(-1, order), ids.gather(-1, order)
    pad = torch.rand(ids.shape) < padding
    logprobs[pad] = float("-inf")
    ids[pad] = torch.randint(-5, V + 5, (int(pad.sum()),))
    problem["teacher"] = TopK(ids.to(ids_dtype), logprobs.to(logprob_dtype), tail)
    return problem


def _clone_teacher(teacher, requires_grad):
    if isinstance(teacher, TopK):
        return teacher
    return teacher.detach().clone().requires_grad_(requires_grad)


def _inputs(problem) -> dict:
    """Every tensor of the problem by name (a TopK's two among them)."""
    tensors = {k: v for k, v in problem.items() if isinstance(v, torch.Tensor)}
    if isinstance(problem["teacher"], TopK):
        tensors.update(teacher_ids=problem["teacher"].token_ids, teacher_logprobs=problem["teacher"].logprobs)
    return tensors


def run_loss(fn, problem, kwargs, teacher_grad, upstream):
    """(loss, stats, gradients) of fn (fused_window_kl's signature) on `problem`: the student's gradient, and the
    teacher's when teacher_grad, for the upstream gradient `upstream` (None: ones)."""
    student = problem["student"].detach().clone().requires_grad_(True)
    teacher = _clone_teacher(problem["teacher"], teacher_grad)
    loss, stats = fn(student, teacher, mask=problem["mask"], cu_seqlens=problem["cu_seqlens"],
                     vocab_size=problem["vocab_size"], return_stats=True, **kwargs)
    grads = torch.autograd.grad(loss, [student, teacher] if teacher_grad else [student],
                                grad_outputs=upstream if upstream is not None else torch.ones_like(loss))
    return loss, stats, grads


def _plain_at_input_dtype(problem, kwargs, ref_stats, teacher_grad, upstream):
    """The reference's per-token formula evaluated by PyTorch at the inputs' dtype, with the true weights."""
    cfg = dict(kwargs)
    V = problem["vocab_size"] or problem["student"].shape[-1]
    student = problem["student"].detach().clone().requires_grad_(True)
    teacher = _clone_teacher(problem["teacher"], teacher_grad)
    valid = problem["mask"]
    knobs = (cfg.get("divergence", "reverse_kl"), cfg.get("beta", 0.5), cfg.get("temperature", 1.0))
    if isinstance(teacher, TopK):
        valid_teacher = TopK(teacher.token_ids[valid], teacher.logprobs[valid], teacher.tail)
        d = topd_kernels.reference.topk_divergence(student[valid][:, :V], valid_teacher, *knobs, dtype=None)
    else:
        d = topd_kernels.reference.token_divergence(student[valid][:, :V], teacher[valid][:, :V], *knobs, dtype=None)
    weight = ref_stats.weight[valid].to(d.dtype)
    g = upstream[valid].to(d.dtype) if upstream is not None else None  # d: the promoted dtype of the two
    total = (weight * d * g).sum() if g is not None else (weight * d).sum()
    return torch.autograd.grad(total, [student, teacher] if teacher_grad else [student])


def _divergence_allowance(problem, temperature):
    """Absolute float32 error allowed in d_t, per token (float64, layout of the mask).

    d is a sum of p * (log p_s - log p_t) terms whose log-probabilities carry float32 roundings of
    about eps * (|a| + |lse|), with a = z / tau and |lse| <= max|a| + log V: so d errs by up to a few
    eps * (max|a_s| + max|a_t| + 2 log V) however small d itself is. Four times that is allowed.
    """
    V = problem["vocab_size"] or problem["student"].shape[-1]

    def largest_finite(z):
        z = z[..., :V].double().abs()
        return torch.where(torch.isfinite(z), z, torch.zeros_like(z)).amax(-1) / temperature

    teacher = problem["teacher"]
    if isinstance(teacher, TopK):  # log-probabilities, used as given; the tail sums k of them
        size = largest_finite(problem["student"]) + largest_finite(teacher.logprobs) * temperature \
            + 2 * math.log(V) + teacher.k
    else:
        size = largest_finite(problem["student"]) + largest_finite(teacher) + 2 * math.log(V)
    return torch.where(problem["mask"], 4 * 2.0 ** -24 * size, torch.zeros_like(size))


def _check_close(name, actual, truth, rtol, atol):
    err = (actual.double() - truth).abs()
    bound = atol + rtol * truth.abs()
    worst = (err - bound).argmax() if err.numel() else None
    assert err.numel() == 0 or bool((err <= bound).all()), (
        f"{name}: max error {err.max().item():.3e} over bound at {worst.item()}: "
        f"actual {actual.flatten()[worst].item()!r}, truth {truth.flatten()[worst].item()!r}"
    )
    return err


def check_backend(backend, problem, teacher_grad=False, **kwargs):
    """Compare `fused_window_kl(backend=...)` with the float64 reference on `problem`."""
    originals = {k: v.clone() for k, v in _inputs(problem).items()}
    upstream = None
    if kwargs.get("reduction") == "none":
        upstream = torch.randn(problem["mask"].shape, dtype=torch.float32, device=problem["mask"].device)
    loss, stats, grads = run_loss(lambda *a, **k: topd_kernels.fused_window_kl(*a, backend=backend, **k),
                              problem, kwargs, teacher_grad, upstream)
    ref_loss, ref_stats, ref_grads = run_loss(window_kl_reference, problem, kwargs, teacher_grad,
                                          upstream.double() if upstream is not None else None)

    d_atol = _divergence_allowance(problem, kwargs.get("temperature", 1.0))
    token_atol = ref_stats.weight.abs() * d_atol
    loss_atol = token_atol if loss.dim() else token_atol.sum()
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    _check_close("loss", loss, ref_loss, FP32_RTOL, loss_atol + 1e-7)
    assert stats.kl.shape == problem["mask"].shape
    _check_close("kl", stats.kl, ref_stats.kl, FP32_RTOL, d_atol + 1e-7)
    _check_close("window_score", stats.window_score, ref_stats.window_score, FP32_RTOL, d_atol.max() + 1e-7)
    assert torch.equal(stats.high_loss, ref_stats.high_loss), "high_loss flags differ"
    assert torch.equal(stats.divergent, ref_stats.divergent), "divergent flags differ"
    _check_close("weight", stats.weight, ref_stats.weight, FP32_RTOL, 1e-6)
    _check_close("entropy", stats.entropy, ref_stats.entropy, FP32_RTOL, d_atol + 1e-7)

    plain = _plain_at_input_dtype(problem, kwargs, ref_stats, teacher_grad, upstream)
    for name, grad, truth, plain_grad in zip(("grad_student", "grad_teacher"), grads, ref_grads, plain):
        assert grad.dtype == problem[name.split("_")[1]].dtype and grad.shape == truth.shape
        assert torch.isfinite(grad).all(), f"{name}: non-finite entries"
        scale = truth.abs().max().item()
        err = _check_close(name, grad, truth, ULP[grad.dtype] + FP32_RTOL, 1e-5 * scale + 1e-30)
        if grad.dtype != torch.float32:
            plain_err = (plain_grad.double() - truth).abs().max().item()
            assert err.max().item() <= 2 * plain_err + 1e-6 * scale, (name, err.max().item(), plain_err)

    for key, value in originals.items():
        now = _inputs(problem)[key]
        assert torch.equal(now, value) if not value.is_floating_point() else \
            torch.equal(now.nan_to_num(), value.nan_to_num()), f"input {key} was modified"
    return loss, stats
