"""The row contract: the one description of a row call, the statistics it returns, the gradient it
writes, and the `torch.library` ops every row backend is registered as.

The loss splits into per-row work over the vocabulary (the expensive part; one row = one token position)
and per-token work over the sequence (the window step, cheap, shared by every backend: `window.py`).
A row backend implements the per-row work as two functions, registered as custom ops by `define_row_ops`:

    forward(student, teacher, mask, call: RowCall) -> stats
    backward(student, teacher, stats, coef, call: RowCall, want_teacher: bool) -> (grad_student, grad_teacher)

Tensors of a row call
    student (B, T, Vs), teacher (B, T, Vt): float32 / bfloat16 / float16; any strides on the first two
        dims (so `logits[:, :-1]` is read in place), stride 1 on the last. Row i is (b, t) = divmod(i, T),
        N = B * T. The packed layout (N, V) arrives as the view (1, N, V). Only the first
        `call.vocab_size` columns are read.
    mask (N,) bool: rows whose mask is False are not read; their statistics are exact zeros.
    stats (NUM_STATS, N) float32, rows named by `Stat` (below).
    coef (N,) float32: the per-row multiplier c_t * (upstream gradient of loss_t) / denominator.
    grad_student (B, T, Vs), grad_teacher (B, T, Vt): fresh, contiguous, the dtypes of the logits:
        grad[..., :V] = coef * dd/dz, grad[..., V:] = 0; rows with coef == 0 are exact zeros and their
        logits are not read (they may be NaN). Without want_teacher, grad_teacher is an empty tensor.

Statistics (per row; z the raw logits, a = z / tau, V = call.vocab_size)
    MAX_S, MAX_T        max_v z[v], of the raw logits (-inf when every entry is -inf)
    LOGSUM_S, LOGSUM_T  log sum_v exp((z[v] - max z) / tau), so that
                            log p[v] = (z[v] - max z) / tau - logsum
                        Keeping the maximum apart from the log-sum-exp keeps log p as accurate as a
                        float32 log_softmax whatever the common offset of the logits (z ~ 1e4 included):
                        z - max z is exact where it matters, lse = max / tau + logsum would not be.
    KL                  d, the row's divergence in nats (SPEC "Per-token divergence")
    MIX_S, MIX_T        jsd: K_s = KL(p_s || m), K_t = KL(p_t || m), d = beta K_t + (1 - beta) K_s;
                        0 for the other divergences. Each is its own statistic (free in the forward's
                        second pass), so no backend recovers K_t as (d - (1 - beta) K_s) / beta.

Gradients (the one derivation; every backend writes these)
    For p = softmax(a) and any F(p) with partials f_u = dF/dp_u:  dF/da_v = p_v (f_v - sum_u p_u f_u),
    and dd/dz = (1 / tau) dd/da.
    reverse_kl  d = sum p_s (log p_s - log p_t)
        student: f = log p_s - log p_t + 1, sum p_s f = d + 1     -> dd/da_s = p_s (log p_s - log p_t - d)
        teacher: dd/dlog p_t = -p_s through log_softmax           -> dd/da_t = p_t - p_s
    forward_kl  the mirror image                                  -> dd/da_s = p_s - p_t,
                                                                     dd/da_t = p_t (log p_t - log p_s - d)
    jsd  m = (1 - beta) p_s + beta p_t, d = beta sum p_t log p_t + (1 - beta) sum p_s log p_s - sum m log m
        student: f = (1 - beta)(log p_s - log m), sum p_s f = (1 - beta) K_s
                                                  -> dd/da_s = (1 - beta) p_s (log p_s - log m - K_s)
        teacher: likewise                         -> dd/da_t = beta p_t (log p_t - log m - K_t)
        log m = logaddexp(log(1 - beta) + log p_s, log(beta) + log p_t)
    Every term p * (...) with p == 0 is 0: an entry at -inf contributes nothing (never 0 * inf).

What comes next fits here (SPEC "Input forms", "Vocabulary-parallel"):
    Hidden      the row functions run on chunks of rows whose logits a matrix product has just made
                (B = 1, T = chunk rows); the chunk's gradient goes back through the product.
    TopK        a teacher given as k (id, log-probability) pairs per row: the teacher side of the call is
                those (B, T, k) tensors instead of logits; the student side (MAX_S, LOGSUM_S, and the
                k gathered log-probabilities) is the same, the divergence runs over k + 1 categories.
    vocabulary  each rank's rows hold V / P columns: MAX_* and LOGSUM_* of the shards combine exactly
    shards      (M = max_r M_r, logsum = log sum_r exp(logsum_r + (M_r - M) / tau)), and the KL cross
                terms sum once rescaled to the combined maxima; a second pass finishes JSD's MIX_*.
"""
from __future__ import annotations

import enum
import inspect
import typing
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Stat(enum.IntEnum):
    """Row of the (NUM_STATS, N) statistics tensor."""

    MAX_S = 0
    LOGSUM_S = 1
    MAX_T = 2
    LOGSUM_T = 3
    KL = 4
    MIX_S = 5
    MIX_T = 6


NUM_STATS = len(Stat)


class RowCall(NamedTuple):
    """The scalar part of a row call; the tensors travel beside it. Validated once, by `make_row_call`."""

    vocab_size: int     # V: columns read from each row, 1 <= V <= min(Vs, Vt)
    temperature: float  # tau > 0
    divergence: int     # config.DIVERGENCE_CODES
    beta: float         # jsd's mixture weight in (0, 1); 0.5 (unused) for the other divergences


def make_row_call(student: Tensor, teacher: Tensor, vocab_size: int, temperature: float, divergence: int,
                  beta: float) -> RowCall:
    """The checked RowCall for 3-D row tensors (the loss's own checks ran before: these guard the ops)."""
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 3 or x.dtype not in LOGIT_DTYPES or (x.shape[-1] > 1 and x.stride(-1) != 1):
            raise ValueError(f"{name}: expected a (B, T, V) float tensor with a unit last stride, got "
                             f"{x.dtype} {tuple(x.shape)} strides {x.stride()}")
    if student.shape[:2] != teacher.shape[:2] or student.device != teacher.device:
        raise ValueError(f"teacher: rows {tuple(teacher.shape[:2])} on {teacher.device} do not match the "
                         f"student's {tuple(student.shape[:2])} on {student.device}")
    if not 1 <= vocab_size <= min(student.shape[-1], teacher.shape[-1]):
        raise ValueError(f"vocab_size: {vocab_size} outside [1, min({student.shape[-1]}, {teacher.shape[-1]})]")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if divergence == 2 and not 0.0 < beta < 1.0:
        raise ValueError(f"beta: must be in (0, 1) for jsd, got {beta}")
    return RowCall(int(vocab_size), float(temperature), int(divergence), float(beta) if divergence == 2 else 0.5)


# ---------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------
def _parameters(*named) -> list:
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return [inspect.Parameter(name, positional, annotation=kind) for name, kind in named]


_CALL = tuple(typing.get_type_hints(RowCall).items())  # the op schema's scalars: RowCall's fields
_FORWARD_SIGNATURE = inspect.Signature(
    _parameters(("student", Tensor), ("teacher", Tensor), ("mask", Tensor), *_CALL), return_annotation=Tensor)
_BACKWARD_SIGNATURE = inspect.Signature(
    _parameters(("student", Tensor), ("teacher", Tensor), ("stats", Tensor), ("coef", Tensor), *_CALL,
                ("want_teacher", bool)),
    return_annotation=tuple[Tensor, Tensor])


def _fake_forward(student, teacher, mask, *call):
    return student.new_empty((NUM_STATS, student.shape[0] * student.shape[1]), dtype=torch.float32)


def _fake_backward(student, teacher, stats, coef, *call_and_want_teacher):
    want_teacher = call_and_want_teacher[-1]
    grad_teacher = torch.empty_like(teacher, memory_format=torch.contiguous_format) if want_teacher \
        else teacher.new_empty((0,))
    return torch.empty_like(student, memory_format=torch.contiguous_format), grad_teacher


class RowOps(NamedTuple):
    """A backend's two row functions, called with a RowCall; each calls the registered op."""

    name: str
    forward_op: Callable
    backward_op: Callable

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor, call: RowCall) -> Tensor:
        return self.forward_op(student, teacher, mask, *call)

    def backward(self, student, teacher, stats, coef, call: RowCall, want_teacher: bool):
        """(grad_student, grad_teacher or None)."""
        grad_student, grad_teacher = self.backward_op(student, teacher, stats, coef, *call, want_teacher)
        return grad_student, grad_teacher if want_teacher else None


def _with_signature(impl: Callable, signature: inspect.Signature, takes_want_teacher: bool) -> Callable:
    """An op body with `signature`, calling impl(tensors..., RowCall(...)[, want_teacher])."""
    n_tensors = len(signature.parameters) - len(_CALL) - int(takes_want_teacher)

    def body(*args):
        tensors, rest = args[:n_tensors], args[n_tensors:]
        call = RowCall(*rest[:len(_CALL)])
        return impl(*tensors, call, *rest[len(_CALL):])

    body.__signature__ = signature
    body.__name__ = impl.__name__
    return body


def define_row_ops(name: str, forward: Optional[Callable], backward: Callable, *, triton: bool = False) -> RowOps:
    """Register forward / backward (signatures at the top of this module) as the ops
    `topd::{name}_row_forward` and `topd::{name}_row_backward`; forward may be None (a backend that
    only provides a backward, such as the CUDA extension).

    triton=True registers them with `torch.library.triton_op` (their bodies launch kernels through
    `torch.library.wrap_triton`, so a compiler sees the kernels); otherwise as opaque `custom_op`s with
    the shared fake implementations. Implementations dispatch on their tensors' device themselves.
    """
    ops = []
    for direction, impl, signature, fake in (
        ("forward", forward, _FORWARD_SIGNATURE, _fake_forward),
        ("backward", backward, _BACKWARD_SIGNATURE, _fake_backward),
    ):
        if impl is None:
            ops.append(None)
            continue
        body = _with_signature(impl, signature, takes_want_teacher=direction == "backward")
        qualname = f"topd::{name}_row_{direction}"
        if triton:
            op = torch.library.triton_op(qualname, body, mutates_args=())
        else:
            op = torch.library.custom_op(qualname, body, mutates_args=())
            op.register_fake(fake)
        ops.append(op)
    return RowOps(name, *ops)
