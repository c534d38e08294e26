"""The row contract: the one description of a row call, the statistics it returns, the gradient it
writes, and the `torch.library` ops every row backend is registered as.

The loss splits into per-row work over the vocabulary (the expensive part; one row = one token position)
and per-token work over the sequence (the window step, cheap, shared by every backend: `window.py`).
A row backend implements the per-row work as two functions, registered as custom ops by `define_row_ops`:

    forward(student, teacher, mask, call: RowCall) -> stats
    backward(student, teacher, stats, coef, call: RowCall, grad_student, grad_teacher) -> None  (writes the grads)

and, for vocabulary-parallel jsd (`vocab_parallel.py`), a third:

    mix(student, teacher, mask, stats, call: RowCall) -> (2, N) float32: K_s and K_t (MIX_S, MIX_T below) over
        the call's columns, with the normalisers MAX_* and LOGSUM_* read from `stats` instead of computed
        (those of the whole rows when the columns are one rank's shard); exact zeros on rows whose mask is False.

Tensors of a row call
    student (B, T, Vs), teacher (B, T, Vt): float32 / bfloat16 / float16; any strides on the first two
        dims (so `logits[:, :-1]` is read in place), stride 1 on the last. Row i is (b, t) = divmod(i, T),
        N = B * T. The packed layout (N, V) arrives as the view (1, N, V). Only the first
        `call.vocab_size` columns are read.
    mask (N,) bool: rows whose mask is False are not read; their statistics are exact zeros.
    stats (NUM_STATS, N) float32, rows named by `Stat` (below).
    coef (N,) float32: the per-row multiplier c_t * (upstream gradient of loss_t) / denominator.
    grad_student (B, T, Vs), grad_teacher (B, T, Vt) or None: the dtypes of the logits, any strides on the
        first two dims that do not overlap, stride 1 on the last; written in full, every row:
        grad[..., :V] = coef * dd/dz, grad[..., V:] = 0; rows with coef == 0 are exact zeros and their
        logits are not read (they may be NaN). The caller allocates them: a fresh tensor, or the rows of
        the gradient of the tensor a view such as `logits[:, :-1]` was cut from (functional.py), so that
        no gradient of the view is ever copied.

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
    ENTROPY_S           H = -sum_v p_s log p_s, the student's entropy (reported, never differentiated). In a
                        pass with the shifted log-weights l = (z - M) / tau and e = exp(l), L = sum e:
                        H = log L - (sum e l) / L, the sum rescaled like the KL cross term when M moves.
    TAIL_S              top-k "bucket" rows only (below): the student's mass outside the live slots; else 0.

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

Top-k teacher rows (SPEC "Top-k teacher"; `define_topk_ops`, TopKCall)
    forward(student, teacher_logprobs, teacher_ids, mask, call: TopKCall) -> stats
    backward(student, teacher_logprobs, teacher_ids, stats, coef, call, grad_student) -> None
    teacher_logprobs (B, T, k) float, teacher_ids (B, T, k) int32 / int64, any strides (views of the caller's
    tensors): slot j of a row is live when its log-probability is not -inf (a padding slot's id is
    never read); the live ids are distinct and in [0, V) (checked before the call). No teacher gradient.
    Categories of a row: its live slots S, plus the tail for "bucket". With a = z_s / tau:
        bucket       MAX_S, LOGSUM_S over the V columns (as for logits), P_j = exp(log p at id_j),
                     P_tail = max(R, 1e-7) with R = sum_{v not a live slot} p_v = TAIL_S, summed over the
                     columns that are not slots (never 1 - sum_S P_j: see the precision note),
                     Q_j = exp(logprob_j), Q_tail = max(1 - sum_S Q_j, 1e-7)
        renormalize  MAX_S, LOGSUM_S over the live slots only (the row is read for ENTROPY_S alone):
                     P_j = exp((z_j - MAX_S) / tau - LOGSUM_S) = softmax over S, Q_j = q_j / sum_S q
    Stored: MAX_S, LOGSUM_S, KL = d over the categories (0 with S empty), ENTROPY_S = the student's entropy over
    its V columns, TAIL_S = R (bucket); the other statistics are 0.
    The backward recomputes the categories from the k slots, the stored MAX_S, LOGSUM_S and TAIL_S (the same
    arithmetic as the forward).
    Gradient. With g_c = dd/dP_c for the divergence taken over the categories and W_c = P_c g_c,
        reverse_kl  W_c = P_c (log P_c - log Q_c + 1)
        forward_kl  W_c = -Q_c
        jsd         W_c = (1 - beta) P_c (log P_c - log M_c),  M_c = (1 - beta) P_c + beta Q_c
    (each 0 where P_c = 0, except forward_kl's). dP_j/da_v = P_j ([v = id_j] - p_v), and for the tail
    dP_tail/da_v = -sum_j dP_j/da_v (P_tail = 1 - sum_S P_j in exact arithmetic), so with f = 1 where the tail
    is free (bucket, R > 1e-7) and f = 0 where it is floored (no gradient through an active floor) or absent
    (renormalize, whose P_j = softmax over S carries its normaliser), g_tail = W_tail / P_tail:
        dd/da_v = -p_v G                              at every column v that is not a slot (bucket; 0 otherwise),
                  G = sum_S W_j + f (W_tail - g_tail)  (= sum_S W_j - f g_tail sum_S P_j, as sum_S P_j = 1 - R)
        dd/da_v = W_j - P_j (sum_S W_i + f W_tail)    at the slot v = id_j (the same expression, with the
                                                       terms in g_tail cancelled: no large g_tail at a slot)
    For renormalize this is P_j (g_j - sum_S P_i g_i) at the slots: the logits formula over k columns.
    Precision. 1 - sum_S P_j would cancel when the slots hold nearly all of the student's mass: it errs by a
    few u (k + LOGSUM_S) (u = 2^-24) whatever the tail's size, and forward_kl multiplies that error by
    Q_tail / P_tail (in d and in g_tail), and decides by rounding noise whether a tail of true mass ~0 is
    floored. R summed over the columns that are not slots has the relative accuracy of any float32 sum of
    positive terms, so P_tail, the floor's test and g_tail are as accurate as the row's other probabilities.
    The teacher's tail 1 - sum_S Q_j is data (the server's numbers), taken as given.
Hidden (SPEC "Input forms") will fit here: the row functions run on chunks of rows whose logits a matrix
product has just made (B = 1, T = chunk rows); the chunk's gradient goes back through the product.
Vocabulary shards (SPEC "Vocabulary-parallel") are `vocab_parallel.py`: the statistics of each rank's columns
combine exactly into those of the whole rows, from which every backward writes the rank's columns' gradient.
"""
from __future__ import annotations

import enum
import inspect
import typing
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..config import JSD, TAIL_CODES

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
    ENTROPY_S = 7
    TAIL_S = 8


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
    if divergence == JSD and not 0.0 < beta < 1.0:
        raise ValueError(f"beta: must be in (0, 1) for jsd, got {beta}")
    return RowCall(int(vocab_size), float(temperature), int(divergence), float(beta) if divergence == JSD else 0.5)


class TopKCall(NamedTuple):
    """A row call whose teacher is top-k log-probabilities: RowCall's fields and the tail."""

    vocab_size: int     # V: the student's columns read; every id of a non-padding slot is in [0, V)
    temperature: float  # tau > 0, the student's only (the teacher's log-probabilities are used as given)
    divergence: int     # config.DIVERGENCE_CODES
    beta: float         # as in RowCall
    tail: int           # config.TAIL_CODES


def make_topk_call(student: Tensor, logprobs: Tensor, ids: Tensor, vocab_size: int, temperature: float,
                   divergence: int, beta: float, tail: int) -> TopKCall:
    """The checked TopKCall for (B, T, Vs) student rows and (B, T, k) teacher slots."""
    call = make_row_call(student, student, vocab_size, temperature, divergence, beta)
    if (logprobs.dim() != 3 or logprobs.shape != ids.shape or logprobs.shape[:2] != student.shape[:2]
            or not logprobs.is_floating_point() or ids.dtype not in (torch.int32, torch.int64)
            or logprobs.device != student.device or ids.device != student.device):
        raise ValueError(f"teacher: expected (B, T, k) float log-probabilities and int32/int64 ids on "
                         f"{student.device} with the student's rows {tuple(student.shape[:2])}, got "
                         f"{logprobs.dtype} {tuple(logprobs.shape)} and {ids.dtype} {tuple(ids.shape)}")
    if tail not in TAIL_CODES.values():
        raise ValueError(f"tail: unknown code {tail}")
    return TopKCall(*call, int(tail))


def rows_disjoint(x: Tensor) -> bool:
    """Whether no two rows of a (B, T, V) tensor with unit last stride share memory: the dims that step,
    taken by increasing stride, must each step past everything the dims inside them span (any order: a
    transposed (T, B) layout is fine). The CUDA extension's validate repeats it at the raw-pointer boundary."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return True  # no rows
    extent = x.shape[-1]  # elements spanned by one row
    for stride, size in sorted((x.stride(d), x.shape[d]) for d in (0, 1) if x.shape[d] > 1):
        if stride < extent:
            return False
        extent += stride * (size - 1)
    return True


def check_gradient(name: str, grad, logits: Tensor) -> None:
    """A gradient a backward writes through its strides (and trusts them): the logits' shape, dtype and
    device, stride 1 on the last dim, rows that do not overlap. Every backward op checks its outputs here."""
    if (not isinstance(grad, Tensor) or grad.shape != logits.shape or grad.dtype != logits.dtype
            or grad.device != logits.device or (grad.shape[-1] > 1 and grad.stride(-1) != 1)
            or not rows_disjoint(grad)):
        got = (f"{grad.dtype} {tuple(grad.shape)} strides {grad.stride()} on {grad.device}"
               if isinstance(grad, Tensor) else type(grad).__name__)
        raise ValueError(f"{name}: expected {logits.dtype} {tuple(logits.shape)} on {logits.device} with a unit "
                         f"last stride and rows that do not overlap, got {got}")


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
                ("grad_student", Tensor), ("grad_teacher", Optional[Tensor])),
    return_annotation=None)
_BACKWARD_WRITES = ("grad_student", "grad_teacher")


def _fake_forward(student, teacher, mask, *call):
    return student.new_empty((NUM_STATS, student.shape[0] * student.shape[1]), dtype=torch.float32)


def _fake_backward(*args):
    return None


_MIX_SIGNATURE = inspect.Signature(
    _parameters(("student", Tensor), ("teacher", Tensor), ("mask", Tensor), ("stats", Tensor), *_CALL),
    return_annotation=Tensor)


def _fake_mix(student, teacher, mask, stats, *call):
    return student.new_empty((2, student.shape[0] * student.shape[1]), dtype=torch.float32)


class RowOps(NamedTuple):
    """A backend's two row functions, called with a RowCall; each calls the registered op."""

    name: str
    forward_op: Callable
    backward_op: Callable
    mix_op: Optional[Callable] = None

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor, call: RowCall) -> Tensor:
        return self.forward_op(student, teacher, mask, *call)

    def mix(self, student: Tensor, teacher: Tensor, mask: Tensor, stats: Tensor, call: RowCall) -> Tensor:
        """(K_s, K_t) (2, N) over the call's columns with the normalisers of `stats`."""
        return self.mix_op(student, teacher, mask, stats, *call)

    def backward_into(self, student, teacher, stats, coef, call: RowCall, grad_student, grad_teacher) -> None:
        """Write the gradients into grad_student and grad_teacher (or None)."""
        self.backward_op(student, teacher, stats, coef, *call, grad_student, grad_teacher)

    def backward(self, student, teacher, stats, coef, call: RowCall, want_teacher: bool):
        """(grad_student, grad_teacher or None), fresh and contiguous."""
        grad_student = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        grad_teacher = torch.empty(teacher.shape, dtype=teacher.dtype, device=teacher.device) \
            if want_teacher else None
        self.backward_into(student, teacher, stats, coef, call, grad_student, grad_teacher)
        return grad_student, grad_teacher


def _with_signature(impl: Callable, signature: inspect.Signature, n_tensors: int, call_type, writes) -> Callable:
    """An op body with `signature`, calling impl(*first n_tensors args, call_type(...), *the rest) after
    checking the gradients it will write (the backward's trailing arguments; the forward has none): each
    against the logits tensor of the same position (student, then teacher)."""
    n_call = len(call_type._fields)

    def body(*args):
        call = call_type(*args[n_tensors:n_tensors + n_call])
        grads = args[n_tensors + n_call:]
        for name, grad, logits in zip(writes, grads, args[:2]):
            if grad is not None:
                check_gradient(name, grad, logits)
        return impl(*args[:n_tensors], call, *grads)

    body.__signature__ = signature
    body.__name__ = impl.__name__
    return body


def _register(qualname: str, impl: Callable, signature: inspect.Signature, n_tensors: int, call_type, writes,
              fake: Callable, triton: bool):
    body = _with_signature(impl, signature, n_tensors, call_type, writes)
    if triton:
        return torch.library.triton_op(qualname, body, mutates_args=writes)
    op = torch.library.custom_op(qualname, body, mutates_args=writes)
    op.register_fake(fake)
    return op


def define_row_ops(name: str, forward: Optional[Callable], backward: Callable, *, mix: Optional[Callable] = None,
                   triton: bool = False) -> RowOps:
    """Register forward / backward / mix (signatures at the top of this module) as the ops
    `topd::{name}_row_forward`, `topd::{name}_row_backward` (which writes into grad_student and
    grad_teacher) and `topd::{name}_row_mix`; forward and mix may be None (a backend that only provides a
    backward, such as the CUDA extension).

    triton=True registers them with `torch.library.triton_op` (their bodies launch kernels through
    `torch.library.wrap_triton`, so a compiler sees the kernels); otherwise as opaque `custom_op`s with
    the shared fake implementations. Implementations dispatch on their tensors' device themselves.
    """
    ops = []
    for direction, impl, signature, writes, fake in (
        ("forward", forward, _FORWARD_SIGNATURE, (), _fake_forward),
        ("backward", backward, _BACKWARD_SIGNATURE, _BACKWARD_WRITES, _fake_backward),
        ("mix", mix, _MIX_SIGNATURE, (), _fake_mix),
    ):
        n_tensors = 3 if direction == "forward" else 4
        ops.append(None if impl is None else _register(f"topd::{name}_row_{direction}", impl, signature,
                                                       n_tensors, RowCall, writes, fake, triton))
    return RowOps(name, *ops)


# ---------------------------------------------------------------------------------------------------
# Top-k teacher rows
# ---------------------------------------------------------------------------------------------------
_TOPK_CALL = tuple(typing.get_type_hints(TopKCall).items())
_TOPK_FORWARD_SIGNATURE = inspect.Signature(
    _parameters(("student", Tensor), ("teacher_logprobs", Tensor), ("teacher_ids", Tensor), ("mask", Tensor),
                *_TOPK_CALL), return_annotation=Tensor)
_TOPK_BACKWARD_SIGNATURE = inspect.Signature(
    _parameters(("student", Tensor), ("teacher_logprobs", Tensor), ("teacher_ids", Tensor), ("stats", Tensor),
                ("coef", Tensor), *_TOPK_CALL, ("grad_student", Tensor)), return_annotation=None)


class TopKOps(NamedTuple):
    """A backend's row functions for a top-k teacher (TopKCall), with the interface of RowOps the loss uses:
    the teacher arrives as its log-probabilities and, after them, its ids. No gradient reaches the teacher."""

    name: str
    forward_op: Callable
    backward_op: Callable

    def forward(self, student: Tensor, logprobs: Tensor, ids: Tensor, mask: Tensor, call: TopKCall) -> Tensor:
        return self.forward_op(student, logprobs, ids, mask, *call)

    def backward_into(self, student, logprobs, ids, stats, coef, call: TopKCall, grad_student,
                      grad_teacher=None) -> None:
        """Write the student's gradient into grad_student (grad_teacher must be None)."""
        if grad_teacher is not None:
            raise ValueError("grad_teacher: a top-k teacher's log-probabilities get no gradient")
        self.backward_op(student, logprobs, ids, stats, coef, *call, grad_student)


def define_topk_ops(name: str, forward: Callable, backward: Callable, *, triton: bool = False) -> TopKOps:
    """Register forward(student, logprobs, ids, mask, call: TopKCall) -> stats and
    backward(student, logprobs, ids, stats, coef, call, grad_student) -> None as the ops
    `topd::{name}_topk_forward` and `topd::{name}_topk_backward`, as `define_row_ops` does."""
    return TopKOps(name,
                   _register(f"topd::{name}_topk_forward", forward, _TOPK_FORWARD_SIGNATURE, 4, TopKCall, (),
                             _fake_topk_forward, triton),
                   _register(f"topd::{name}_topk_backward", backward, _TOPK_BACKWARD_SIGNATURE, 5, TopKCall,
                             ("grad_student",), _fake_backward, triton))


def _fake_topk_forward(student, *args):
    return student.new_empty((NUM_STATS, student.shape[0] * student.shape[1]), dtype=torch.float32)
