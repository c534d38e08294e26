"""The Triton top-k rows (`topd_kernels.rows.triton_topk`) against the PyTorch top-k rows (`torch_rows.TOPK_OPS`,
the same float32 arithmetic: the oracle) and against float64, through their registered ops
(contract.py, "Top-k teacher rows").

On a machine without CUDA these run in the Triton interpreter (conftest.py sets TRITON_INTERPRET=1).

Truth: float64 `reference.topk_divergence` for d, its gradient by autograd (coef * dd/dz), the float64
normalisers (MAX_S = max z over V columns for bucket / over the live slots' logits for renormalize, LOGSUM_S =
logsumexp((z - MAX_S) / tau) over the same set), `reference.student_entropy` over the V columns (ENTROPY_S,
both tails) and the student's mass outside the live slots summed in float64 (TAIL_S, bucket; 0 for
renormalize). Precision model, three-way as tests/test_triton_rows.py: the kernels compute in float32 from the
exact inputs, so (1) their error stays at float32 level (MAX_S exact; LOGSUM_S, KL and the gradient within a few
float32 units of the row's log-domain size, the tail's relative error, of that order too since it is summed
over the non-slot columns (contract.py, "Precision"), entering d times P_tail |dd/dP_tail|; TAIL_S to a few
float32 units relative; ENTROPY_S to a few float32 units of (1 + spread) (1 + H), spread the row's max
|z - max z| / tau), and (2) it is within a small multiple of the PyTorch path's error on the same inputs (its
gradient taken in float32, before any output rounding), plus one unit of the output dtype for the gradient's
cast.

Every output is NaN-filled before the kernels run (nan_poisoned_empty), masked rows and rows with coef == 0
hold NaN logits (not read), padding slots hold garbage ids (never read, never used as an address), and the
gradient is written a second time into strided rows of a larger NaN-filled buffer, which must come out bit
for bit the same with nothing outside the rows touched.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from typing import NamedTuple, Optional

import pytest
import torch

from row_cases import GRAD_LAYOUTS, ULP, grad_rows_in_buffer
from topd_kernels import reference
from topd_kernels.config import DIVERGENCE_CODES, TAIL_CODES
from topd_kernels.forms import TopK
from topd_kernels.rows import registry, torch_rows
from topd_kernels.rows import triton_rows as tr
from topd_kernels.rows import triton_topk as tk
from topd_kernels.rows.contract import NUM_STATS, Stat, make_topk_call

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DIVERGENCES = list(DIVERGENCE_CODES)
TAILS = list(TAIL_CODES)
BETA = 0.3
U = 2.0 ** -24       # float32 unit roundoff
PLAIN_FACTOR = 4.0   # the kernels' error against the PyTorch path's
NAN, INF = float("nan"), float("inf")
# the statistics a top-k forward computes (TAIL_S: 0 for renormalize); the others are 0
KEPT = (Stat.MAX_S, Stat.LOGSUM_S, Stat.KL, Stat.ENTROPY_S, Stat.TAIL_S)


@pytest.fixture(autouse=True)
def poisoned(nan_poisoned_empty):
    """torch.empty returns NaN-filled tensors (conftest.py): the forward's stats and the gradients included."""


def block(monkeypatch, size):
    """Force BLOCK_V = size (many blocks per row, a partial last block); None: the default."""
    monkeypatch.setattr(tr, "BLOCK_V_OVERRIDE", size)


def flat(x):
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
B, T = 2, 3  # N = 6 rows, each with a role:
MASKED_ROW = 2      # mask False, coef 0, NaN logits: nothing read, zero stats and gradient
EMPTY_ROW = 3       # every slot padding (S empty): d = 0
ZERO_COEF_ROW = 5   # mask True, coef 0: its logits turn NaN after the forward (the backward does not read them)
FULL_ROW = 0        # no padding slot
PAD_FRACTION = 0.3  # padding slots elsewhere


class Case(NamedTuple):
    vocab: int
    pad_cols: int                 # student columns past V (Vs = V + pad_cols), filled with garbage
    k: int
    student_dtype: torch.dtype
    logprob_dtype: torch.dtype
    id_dtype: torch.dtype
    temperature: float
    block_v: Optional[int]        # BLOCK_V_OVERRIDE (None: one block per row under the interpreter)
    outside: Optional[float]      # the student's mass outside the live slots, made exactly so (None: as drawn)
    layout: str                   # row_cases.GRAD_LAYOUTS: the strided gradient rows written into

    def __str__(self):
        dt = lambda d: str(d).replace("torch.", "")  # noqa: E731
        return (f"V{self.vocab}+{self.pad_cols}-k{self.k}-{dt(self.student_dtype)}-lq{dt(self.logprob_dtype)}-"
                f"{dt(self.id_dtype)}-tau{self.temperature:g}-bv{self.block_v}"
                + (f"-outside{self.outside:g}" if self.outside is not None else "") + f"-{self.layout}")


CASES = [
    Case(1271, 9, 32, torch.float32, torch.float32, torch.int64, 1.0, None, None, "inner"),
    Case(1271, 0, 4, torch.bfloat16, torch.bfloat16, torch.int32, 0.7, 256, None, "causal"),
    Case(97, 3, 1, torch.float32, torch.float16, torch.int32, 0.7, None, None, "transposed"),
    Case(97, 0, 97, torch.bfloat16, torch.float32, torch.int64, 1.0, 32, None, "inner"),  # k = V
    Case(1271, 0, 32, torch.float32, torch.float32, torch.int32, 0.7, 512, 1e-5, "causal"),
]


class Inputs(NamedTuple):
    student: torch.Tensor   # (B, T, Vs) strided rows (a slice x[:, :-1] of a bigger tensor)
    logprobs: torch.Tensor  # (B, T, k), strided on every dim
    ids: torch.Tensor       # (B, T, k), strided on every dim, garbage (even out of range) on padding slots
    mask: torch.Tensor      # (N,) bool
    coef: torch.Tensor      # (N,) float32, 0 on the masked row and on ZERO_COEF_ROW


def garbage_ids(shape, dtype):
    """Ids no kernel may read: far out of [0, V) on both sides (within the dtype)."""
    bound = 2 ** 31 - 1 if dtype == torch.int32 else 2 ** 40
    return torch.randint(-bound, bound, shape, dtype=torch.int64)


def slot_view(values: torch.Tensor, dtype, kind: int) -> torch.Tensor:
    """(B, T, k) values as a strided view of a larger tensor of `dtype` (kind 0: every other slot of a
    (B, T, 2k) tensor; kind 1: a (T, B, k) tensor transposed)."""
    if kind == 0:
        base = torch.zeros(B, T, 2 * values.shape[-1], dtype=dtype, device=DEVICE)
        view = base[..., ::2]
    else:
        view = torch.zeros(T, B, values.shape[-1], dtype=dtype, device=DEVICE).transpose(0, 1)
    view.copy_(values.to(DEVICE))
    assert not view.is_contiguous()
    return view


def make_inputs(case: Case, scale=3.0, full_rows=(FULL_ROW,), teacher_tail=None) -> Inputs:
    """The rows of `case` (roles above). teacher_tail: the live slots' log-probabilities are renormalised to hold
    1 - teacher_tail of the teacher's mass (None: the teacher's top-k as drawn)."""
    n, V, k = B * T, case.vocab, case.k
    z = torch.randn(n, V, dtype=torch.float64) * scale
    teacher = (0.6 * torch.randn(n, V, dtype=torch.float64) * scale + 0.8 * z).log_softmax(-1)
    values, ids = teacher.topk(k, dim=-1)
    order = torch.rand(n, k).argsort(-1)  # unsorted slots
    values, ids = values.gather(-1, order), ids.gather(-1, order)
    pad = torch.rand(n, k) < PAD_FRACTION
    pad[list(full_rows)] = False
    pad[EMPTY_ROW] = True
    values[pad] = -INF
    ids = torch.where(pad, garbage_ids((n, k), case.id_dtype), ids)
    live = ~pad
    if case.outside is not None:  # shift the live slots' logits until the rest of the row holds `outside`
        a = z / case.temperature
        slot_mass = on_slots(ids, live, V)
        rest = torch.where(slot_mass, -INF, a).logsumexp(-1)
        held = torch.where(slot_mass, a, -INF).logsumexp(-1)
        shift = (rest + math.log((1 - case.outside) / case.outside) - held) * case.temperature
        shift = torch.where(live.any(-1), shift, 0.0)
        z = torch.where(slot_mass, z + shift[:, None], z)
    if teacher_tail is not None:
        values = torch.where(live, values - torch.where(live, values, -INF).logsumexp(-1, keepdim=True), -INF)
        values = values + math.log1p(-teacher_tail)
    wide = torch.full((B, T + 1, V + case.pad_cols), 1e4, dtype=torch.float64)
    wide[:, :T, :V] = z.view(B, T, V)
    student = wide.to(case.student_dtype).to(DEVICE)[:, :-1]  # strided rows, read in place
    assert not student.is_contiguous()
    student[MASKED_ROW // T, MASKED_ROW % T] = NAN
    logprobs = slot_view(values.view(B, T, k), case.logprob_dtype, 0)
    id_view = slot_view(ids.view(B, T, k), case.id_dtype, 1)
    mask = torch.ones(n, dtype=torch.bool, device=DEVICE)
    mask[MASKED_ROW] = False
    coef = torch.randn(n, device=DEVICE)
    coef[MASKED_ROW] = 0.0
    coef[ZERO_COEF_ROW] = 0.0
    return Inputs(student, logprobs, id_view, mask, coef)


def on_slots(ids, live, V):
    """(N, V) bool: the columns of the live slots' ids."""
    count = torch.zeros(ids.shape[0], V, dtype=torch.int32, device=ids.device)
    return count.scatter_add_(-1, torch.where(live, ids, 0).long(), live.int()) > 0


def call_of(inp: Inputs, case_vocab, temperature, divergence, tail):
    return make_topk_call(inp.student, inp.logprobs, inp.ids, case_vocab, temperature, DIVERGENCE_CODES[divergence],
                          BETA, TAIL_CODES[tail])


def poison_row(student, row):
    """Fill one row with NaN (a row the backward must not read)."""
    student = student.clone()
    student[row // T, row % T] = NAN
    return student


# ---------------------------------------------------------------------------------------------------
# Truth
# ---------------------------------------------------------------------------------------------------
class Truth(NamedTuple):
    stats: torch.Tensor      # (5, N) float64: MAX_S, LOGSUM_S, KL, ENTROPY_S, TAIL_S (KEPT), 0 on rows not in `rows`
    grad: torch.Tensor       # (N, V) float64: coef * dd/dz
    spread: torch.Tensor     # (N,) max |z - MAX_S| / tau over the entries the normalisers cover (finite ones)
    row_spread: torch.Tensor  # (N,) max |z - max z| / tau over the row's V columns (finite ones): the entropy's
    tail_amp: torch.Tensor   # (N,) P_tail |dd/dP_tail| + 1 (bucket; see `tail_amplification`), 1 (renormalize)


def tail_amplification(p_tail, q_tail, divergence):
    """How much a relative error in P_tail moves d: P_tail |dd/dP_tail| + 1. reverse_kl P |log(P / Q) + 1| and
    jsd (1 - beta) P |log(P / M)| stay moderate; forward_kl's Q_tail / P_tail, as large as 1e6 when the student
    holds nearly all its mass on the slots, times P_tail is Q_tail <= 1. (The tail is summed over the non-slot
    columns, contract.py "Precision": its error is relative, not a few u absolute as 1 - sum_S P_j's would be.)"""
    if divergence == "reverse_kl":
        return p_tail * (p_tail.log() - q_tail.log() + 1).abs() + 1
    if divergence == "forward_kl":
        return q_tail + 1
    m_tail = (1 - BETA) * p_tail + BETA * q_tail
    return (1 - BETA) * p_tail * (p_tail.log() - m_tail.log()).abs() + 1


def truth(student, logprobs, ids, V, tau, divergence, tail, coef, rows) -> Truth:
    n = rows.shape[0]
    z, lq, idx = flat(student)[:, :V].double().cpu(), flat(logprobs).double().cpu(), flat(ids).cpu()
    coef, rows = coef.double().cpu(), rows.cpu()
    stats = torch.zeros(len(KEPT), n, dtype=torch.float64)
    grad = torch.zeros(n, V, dtype=torch.float64)
    spread = torch.zeros(n, dtype=torch.float64)
    row_spread = torch.zeros(n, dtype=torch.float64)
    tail_amp = torch.ones(n, dtype=torch.float64)
    sel = rows.nonzero().flatten()
    zs = z[sel].clone().requires_grad_(True)
    d = reference.topk_divergence(zs, TopK(idx[sel], lq[sel], tail=tail), divergence, BETA, tau)
    (g,) = torch.autograd.grad((d * coef[sel]).sum(), zs)
    zs = zs.detach()
    live = lq[sel] > -INF
    z_slots = torch.where(live, zs.gather(-1, torch.where(live, idx[sel], 0).long()), -INF)
    if tail == "bucket":
        covered = zs
        mx = zs.amax(-1)
    else:
        covered = z_slots
        mx = torch.where(live.any(-1), z_slots.amax(-1), 0.0)
    logsum = torch.logsumexp((covered - mx[:, None]) / tau, -1)
    logsum = torch.where(live.any(-1) | (tail == "bucket"), logsum, 0.0)
    fin = torch.isfinite(covered)
    spread[sel] = torch.where(fin, (mx[:, None] - covered).abs(), 0.0).amax(-1) / tau
    row_spread[sel] = torch.where(zs.isfinite(), (zs.amax(-1, keepdim=True) - zs).abs(), 0.0).amax(-1) / tau
    rest = torch.zeros_like(mx)
    if tail == "bucket":  # the student's mass outside the live slots, summed over the other columns
        p_row = torch.softmax(zs / tau, -1)
        rest = p_row.masked_fill(on_slots(idx[sel], live, V), 0.0).sum(-1)
        p_tail = rest.clamp(min=1e-7)
        q_tail = (1 - torch.where(live, lq[sel].exp(), 0.0).sum(-1)).clamp(min=1e-7)
        tail_amp[sel] = tail_amplification(p_tail, q_tail, divergence)
    stats[:, sel] = torch.stack((mx, logsum, d.detach(), reference.student_entropy(zs, tau), rest))
    grad[sel] = g
    return Truth(stats, grad, spread, row_spread, tail_amp)


# ---------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------
def run_ops(ops, student, logprobs, ids, mask, coef, call, grad=None):
    """(stats, grad) from a backend's ops; the gradient fresh (NaN-filled) unless given."""
    stats = ops.forward(student, logprobs, ids, mask, call)
    if grad is None:
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    ops.backward_into(poison_row(student, ZERO_COEF_ROW), logprobs, ids, stats, coef, call, grad)
    return stats, grad


def check(case: Case, inp: Inputs, divergence: str, tail: str, check_truth=True, grad=None):
    """Run the Triton ops (the gradient into `grad`, or a fresh NaN-filled one) and compare with the PyTorch
    ops and (check_truth) float64; returns (stats, grad, torch's stats, torch's grad)."""
    V, tau, n = case.vocab, case.temperature, B * T
    call = call_of(inp, V, tau, divergence, tail)
    stats, grad = run_ops(tk.OPS, inp.student, inp.logprobs, inp.ids, inp.mask, inp.coef, call, grad)

    # The PyTorch path: once as is (the outputs at the student's dtype), once on the float32 student (the same
    # float32 arithmetic, its gradient before any output rounding: the yardstick of the three-way check).
    t_stats, t_grad = run_ops(torch_rows.TOPK_OPS, inp.student, inp.logprobs, inp.ids, inp.mask, inp.coef, call)
    s32 = inp.student.float()
    f_stats, f_grad = run_ops(torch_rows.TOPK_OPS, s32, inp.logprobs, inp.ids, inp.mask, inp.coef,
                              call_of(Inputs(s32, *inp[1:]), V, tau, divergence, tail))

    # Shapes, exact zeros, nothing unwritten.
    assert stats.dtype == torch.float32 and stats.shape == (NUM_STATS, n)
    assert grad.dtype == inp.student.dtype and grad.shape == inp.student.shape
    assert not stats.isnan().any(), "stats: unwritten (NaN) entries"
    for s in Stat:
        if s not in KEPT:
            assert torch.equal(stats[s], torch.zeros_like(stats[s])), f"{s.name}: must be 0"
    assert torch.equal(stats[:, MASKED_ROW], torch.zeros(NUM_STATS, device=DEVICE)), "masked row: stats not 0"
    g = flat(grad)
    assert not g.isnan().any(), "grad: unwritten (NaN) entries"
    assert torch.equal(g[:, V:], torch.zeros_like(g[:, V:])), "grad: padding columns not 0"
    for row in (MASKED_ROW, ZERO_COEF_ROW):
        assert torch.equal(g[row], torch.zeros_like(g[row])), f"grad: row {row} (coef 0) not exact zeros"
    if tail == "renormalize":  # no tail, no gradient off the live slots
        assert torch.equal(stats[Stat.TAIL_S], torch.zeros_like(stats[Stat.TAIL_S])), "TAIL_S: must be 0"
        on_slot = on_slots(flat(inp.ids), flat(inp.logprobs) > -INF, V)
        assert torch.equal(g[:, :V][~on_slot], torch.zeros_like(g[:, :V][~on_slot]))

    # Against the PyTorch path: the maxima bit for bit, the rest close.
    assert torch.equal(stats[Stat.MAX_S], t_stats[Stat.MAX_S]), "MAX_S differs from the torch path"
    assert torch.equal(stats[Stat.MAX_S], f_stats[Stat.MAX_S])
    if not check_truth:
        return stats, grad, t_stats, t_grad

    live_rows = inp.mask
    tr64 = truth(inp.student, inp.logprobs, inp.ids, V, tau, divergence, tail, inp.coef, live_rows)
    kept = stats[list(KEPT)].double().cpu()
    plain = f_stats[list(KEPT)].double().cpu()
    assert torch.equal(kept[0], tr64.stats[0]), "MAX_S: the maximum of the raw logits must be exact"
    # float32 level of a row: its log-domain size; the tail's error is relative, of that order (contract.py),
    # and moves d by P_tail |dd/dP_tail| times it
    base = 1 + tr64.spread + tr64.stats[1].abs() + tr64.stats[2].abs()
    tail_err = base * (tr64.tail_amp - 1)
    entropy = tr64.stats[3]
    levels = {  # per statistic: the error allowed at float32 level (in units of U)
        "LOGSUM_S": base,
        "KL": base + tail_err,
        "ENTROPY_S": (1 + tr64.row_spread) * (1 + entropy),
        "TAIL_S": base * tr64.stats[4],  # relative: summed over the non-slot columns
    }
    for name, level in levels.items():
        i = KEPT.index(Stat[name])
        err = (kept[i] - tr64.stats[i]).abs()
        plain_err = (plain[i] - tr64.stats[i]).abs()
        worst = (err / (8 * U * level + 1e-300)).max().item()
        assert worst <= 1, f"{name}: error {err.max().item():.3e} above float32 level (ratio {worst:.3g})"
        allowed = PLAIN_FACTOR * plain_err + 2 * U * level
        assert (err <= allowed).all(), f"{name}: error {err.max().item():.3e} vs torch {plain_err.max().item():.3e}"

    got, want = g[:, :V].double().cpu(), tr64.grad
    scale = inp.coef.double().abs().cpu()[:, None] / tau
    # the row's float32 log-domain error (p <= 1) and the tail's through g_tail (p_v |g_tail| <= P_tail |g_tail|)
    f32 = 16 * U * scale * (base + tail_err)[:, None]
    out_ulp = ULP[grad.dtype] * want.abs()
    err = (got - want).abs()
    worst = (err / (f32 + out_ulp + 1e-30)).max().item()
    assert worst <= 1, f"grad: error {err.max().item():.3e} above float32 level (ratio {worst:.3g})"
    plain_err = (f_grad[..., :V].reshape(n, V).double().cpu() - want).abs().amax(-1, keepdim=True)
    allowed = PLAIN_FACTOR * plain_err + out_ulp + 2 * U * scale * base[:, None]
    assert (err <= allowed).all(), (f"grad: error {err.max().item():.3e} vs torch "
                                    f"{plain_err.max().item():.3e} (ratio {(err / allowed).max().item():.3g})")
    return stats, grad, t_stats, t_grad


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_rows_match_torch_and_float64(seed, monkeypatch, divergence, tail, case):
    """Both tails, every divergence; k = 1, 4, 32 and V; padding slots with garbage ids; unsorted slots; int32
    and int64 ids; float32 / bfloat16 students, float32 / bfloat16 / float16 log-probabilities; tau 1 and 0.7;
    padding columns; strided student, slot and gradient rows; one block or many per row; a masked row and a
    coef == 0 row with NaN logits; slots holding all but 1e-5 of the student's mass."""
    block(monkeypatch, case.block_v)
    inp = make_inputs(case)
    # The gradient written into strided rows of a larger NaN-filled buffer: nothing outside them touched.
    rows = grad_rows_in_buffer(inp.student.shape, inp.student.dtype, DEVICE, case.layout)
    check(case, inp, divergence, tail, grad=rows.rows)
    assert rows.untouched_outside(), "grad: written outside its rows"


@pytest.mark.parametrize("tail", TAILS)
def test_strides_are_only_addressing(seed, monkeypatch, tail):
    """Strided inputs and a fresh gradient, contiguous inputs, and every layout of strided gradient rows give
    the same statistics and gradient bit for bit."""
    case = CASES[1]
    block(monkeypatch, case.block_v)
    inp = make_inputs(case)
    call = call_of(inp, case.vocab, case.temperature, "forward_kl", tail)
    stats, grad = run_ops(tk.OPS, inp.student, inp.logprobs, inp.ids, inp.mask, inp.coef, call)
    cont = Inputs(inp.student.contiguous(), inp.logprobs.contiguous(), inp.ids.contiguous(), inp.mask, inp.coef)
    assert cont.student.stride() != inp.student.stride() and cont.ids.stride() != inp.ids.stride()
    stats_c, grad_c = run_ops(tk.OPS, *cont, call_of(cont, case.vocab, case.temperature, "forward_kl", tail))
    assert torch.equal(stats_c, stats) and torch.equal(grad_c, grad)
    for layout in GRAD_LAYOUTS:
        rows = grad_rows_in_buffer(inp.student.shape, inp.student.dtype, DEVICE, layout)
        tk.OPS.backward_into(poison_row(inp.student, ZERO_COEF_ROW), inp.logprobs, inp.ids, stats, inp.coef, call,
                             rows.rows)
        assert torch.equal(rows.rows, grad), f"grad: {layout} rows differ from the fresh gradient"
        assert rows.untouched_outside(), f"grad: {layout}: written outside its rows"


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_negative_infinity_student_logits(seed, monkeypatch, divergence, tail):
    """Student logits at -inf, off the slots and at a live slot: p == 0 terms are 0 (never 0 * inf), and
    forward_kl, whose teacher has mass where the student has none, is +inf as on the torch path. The float64
    truth is differentiable only where d is finite: the rows are compared with the torch path.

    Row 4 holds all of the student's mass on its slots: its tail, summed over the other columns (all at -inf), is
    exactly 0 (floored; forward_kl's g_tail = -Q_tail / P_tail never sees rounding noise), and the entropy
    leaves the -inf entries out."""
    block(monkeypatch, 64)
    case = Case(97, 2, 8, torch.float32, torch.float32, torch.int64, 0.7, 64, None, "inner")
    inp = make_inputs(case, full_rows=(0, 4))
    z = flat(inp.student.contiguous())
    ids, live = flat(inp.ids.contiguous()), flat(inp.logprobs.contiguous()) > -INF
    z[:, 5:40:3] = -INF                      # off the slots (and maybe some slots)
    z[0, ids[0][live[0]][0]] = -INF          # a live slot of row 0 at -inf
    z[4, :case.vocab] = -INF                 # row 4: every column -inf but its live slots
    z[4, ids[4][live[4]]] = torch.randn(int(live[4].sum()), dtype=z.dtype, device=DEVICE)
    student = torch.full((B, T + 1, z.shape[-1]), 7.0, dtype=z.dtype, device=DEVICE)[:, :-1]
    student.copy_(z.view(B, T, -1))
    inp = inp._replace(student=student)
    stats, grad, t_stats, t_grad = check(case, inp, divergence, tail, check_truth=False)
    d, t_d = stats[Stat.KL], t_stats[Stat.KL]
    if divergence == "forward_kl":
        assert d[0].item() == INF and t_d[0].item() == INF, "forward_kl: q > 0 = p must give +inf"
    assert torch.equal(torch.isinf(d), torch.isinf(t_d))
    fin = torch.isfinite(t_d)
    assert torch.allclose(d[fin], t_d[fin], rtol=1e-5, atol=1e-5)
    for s in (Stat.LOGSUM_S, Stat.ENTROPY_S, Stat.TAIL_S):
        assert torch.allclose(stats[s], t_stats[s], rtol=1e-5, atol=1e-5), s.name
    if tail == "bucket":
        assert stats[Stat.TAIL_S, 4].item() == 0.0, "row 4: no mass outside the slots"
    others = [s for s in Stat if s != Stat.KL]
    assert torch.isfinite(stats[others]).all() and torch.isfinite(grad).all()
    assert torch.allclose(flat(grad), flat(t_grad), rtol=1e-4, atol=1e-6 * inp.coef.abs().max().item())


@pytest.mark.parametrize("outside", [1e-30, 3e-8, 1e-5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_student_mass_outside_the_slots(seed, monkeypatch, divergence, outside):
    """The student holds all but `outside` of its mass on the live slots (~0, below the 1e-7 floor, above it)
    while the teacher keeps 10% in its tail, so forward_kl multiplies any error of the student's tail by
    Q_tail / P_tail (up to 1e6): summed over the non-slot columns (TAIL_S), never 1 - sum_S P_j, the tail is
    accurate to float32 relative, the floor's test is never decided by rounding, and d, the statistics and the
    gradient are at float32 accuracy of the float64 reference (the full check, with the precision model's tail
    term P_tail |dd/dP_tail| <= Q_tail for forward_kl: no cancellation allowance). Several blocks per row."""
    block(monkeypatch, 128)
    case = Case(400, 0, 8, torch.float32, torch.float32, torch.int64, 1.0, 128, outside, "inner")
    inp = make_inputs(case, full_rows=(0, 1, 4), teacher_tail=0.1)
    tail = flat(inp.student)[:, :case.vocab].double().softmax(-1).masked_fill(
        on_slots(flat(inp.ids.contiguous()), flat(inp.logprobs.contiguous()) > -INF, case.vocab), 0.0).sum(-1)
    assert torch.allclose(tail[[0, 1, 4]], torch.full((3,), outside, dtype=torch.float64), rtol=1e-3)
    stats, *_ = check(case, inp, divergence, "bucket")
    assert torch.allclose(stats[Stat.TAIL_S, [0, 1, 4]].double(), tail[[0, 1, 4]], rtol=1e-5)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_tail_membership_at_block_edges(seed, monkeypatch, id_dtype):
    """TAIL_S leaves out exactly the live slots' columns wherever they fall in the blocks of the row pass: the first
    and last columns of blocks, consecutive ids across a block boundary, several ids in one block, the last
    (partial) block and its last column V - 1, unsorted slots and padding slots with garbage ids. The slots hold
    logits 25 above the rest (nearly all the mass), so a missed slot or a missed non-slot column shows at once."""
    block(monkeypatch, 16)
    V, k = 100, 12
    live_ids = [[0, 15, 16, 17, 31, 50, 51, 52, 53, 96, 99], [3, 47, 98], [15, 16], [], [64, 80, 99], [1, 2]]
    z = torch.randn(B * T, V, dtype=torch.float64)
    ids = garbage_ids((B * T, k), id_dtype)
    lq = torch.full((B * T, k), -INF, dtype=torch.float64)
    for row, chosen in enumerate(live_ids):
        slots = torch.randperm(k)[:len(chosen)]  # live slots scattered among the padding ones
        ids[row, slots] = torch.tensor(chosen, dtype=torch.int64)
        lq[row, slots] = torch.log(torch.full((len(chosen),), 0.9 / max(len(chosen), 1), dtype=torch.float64))
        z[row, chosen] += 25.0
    student = z.float().view(B, T, V).to(DEVICE)
    logprobs, id_view = lq.float().view(B, T, k).to(DEVICE), ids.to(id_dtype).view(B, T, k).to(DEVICE)
    mask = torch.ones(B * T, dtype=torch.bool, device=DEVICE)
    call = make_topk_call(student, logprobs, id_view, V, 1.0, DIVERGENCE_CODES["forward_kl"], BETA,
                          TAIL_CODES["bucket"])
    stats = tk.OPS.forward(student, logprobs, id_view, mask, call)
    slot_cols = on_slots(torch.where(lq > -INF, ids, 0), lq > -INF, V)
    want = z.float().double().softmax(-1).masked_fill(slot_cols, 0.0).sum(-1)
    assert torch.allclose(stats[Stat.TAIL_S].double().cpu(), want, rtol=1e-5, atol=0), (stats[Stat.TAIL_S], want)
    t_stats = torch_rows.TOPK_OPS.forward(student, logprobs, id_view, mask, call)
    assert torch.allclose(stats, t_stats, rtol=1e-5, atol=1e-6)


def test_empty_batch():
    student = torch.zeros(0, 3, 50, device=DEVICE)
    logprobs = torch.zeros(0, 3, 4, device=DEVICE)
    ids = torch.zeros(0, 3, 4, dtype=torch.int64, device=DEVICE)
    call = make_topk_call(student, logprobs, ids, 50, 1.0, 0, BETA, 0)
    stats = tk.OPS.forward(student, logprobs, ids, torch.zeros(0, dtype=torch.bool, device=DEVICE), call)
    assert stats.shape == (NUM_STATS, 0)
    grad = torch.empty_like(student)
    tk.OPS.backward_into(student, logprobs, ids, stats, torch.zeros(0, device=DEVICE), call, grad)


def test_registered_and_refuses_bad_gradients(seed):
    """The registry's Triton backends run these ops for a top-k teacher; a gradient of the wrong dtype or
    with overlapping rows is refused before any kernel runs."""
    assert registry.resolve("triton", DEVICE, form="topk") is tk.OPS
    case = CASES[2]
    inp = make_inputs(case)
    call = call_of(inp, case.vocab, case.temperature, "reverse_kl", "bucket")
    stats = tk.OPS.forward(inp.student, inp.logprobs, inp.ids, inp.mask, call)
    for bad in (torch.zeros(inp.student.shape, dtype=torch.float64, device=DEVICE),
                torch.zeros(inp.student.shape[-1], device=DEVICE).expand(inp.student.shape)):
        with pytest.raises(ValueError, match="grad_student"):
            tk.OPS.backward_into(inp.student, inp.logprobs, inp.ids, stats, inp.coef, call, bad)
    with pytest.raises(ValueError, match="grad_teacher"):
        tk.OPS.backward_into(inp.student, inp.logprobs, inp.ids, stats, inp.coef, call, torch.empty_like(inp.student),
                             torch.empty_like(inp.logprobs))


# ---------------------------------------------------------------------------------------------------
# sm_90 compile (as tests/test_triton_compile.py)
# ---------------------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent(r"""
    import json, os, re, subprocess, tempfile
    import triton
    from torch._library.triton import get_triton_kernels_for_op
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    import topd_kernels.rows.triton_topk as tk

    target = GPUTarget("cuda", 90, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def resources(kernel):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        return {k: int(v) for k, v in dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out)).items()}

    def i64_rows(ttir, pointers):
        # (b, t) = divmod(i, T) in 64 bits, and b * stride_b, t * stride_t in 64 bits for every row pointer
        divmod64 = all(re.search(rf"arith\.{op} %i_n\w*, \S+ : i64", ttir) for op in ("divsi", "remsi"))
        row_muls = re.findall(r"arith\.muli %i_[bt]\w*, \S+ : (\w+)", ttir)
        return bool(divmod64 and row_muls and set(row_muls) == {"i64"}
                    and len(row_muls) == 2 * len(pointers))

    ints = lambda names: {n: "i32" for n in names}
    slots = ["stride_logprobs_b", "stride_logprobs_t", "stride_logprobs_k", "stride_ids_b", "stride_ids_t",
             "stride_ids_k"]
    scalars = {"inv_temperature": "fp32", "beta": "fp32", "log_one_minus_beta": "fp32", "log_beta": "fp32"}
    results = []
    for div in (0, 1, 2):
        for tail in (0, 1):
            for (ds, dl, di), block_k in ((("*bf16", "*fp32", "*i64"), 32), (("*fp32", "*bf16", "*i32"), 256)):
                sig = {"p_student": ds, "p_logprobs": dl, "p_ids": di, "p_sorted": "*i32", "p_mask": "*u8",
                       "p_stats": "*fp32",
                       **ints(["stride_student_b", "stride_student_t"] + slots + ["stride_sorted_n", "length",
                              "stride_mask", "stride_stats_k", "stride_stats_n", "vocab_size", "num_slots"]),
                       **scalars,
                       "DIVERGENCE": "constexpr", "TAIL": "constexpr", "BLOCK_V": "constexpr",
                       "BLOCK_K": "constexpr"}
                # both tails stream the row (the entropy): the default launch of a large vocabulary
                k = triton.compile(ASTSource(tk._topk_forward_kernel, sig, constexprs={
                    "DIVERGENCE": div, "TAIL": tail, "BLOCK_V": 4096, "BLOCK_K": block_k}),
                    target=target, options={"num_warps": 8})
                results.append(dict(kernel="forward", div=div, tail=tail, dtypes=[ds, dl, di], block_k=block_k,
                                    warps=8, i64=i64_rows(k.asm["ttir"], ["s", "lq", "id"]),
                                    **resources(k)))
                sig = {"p_student": ds, "p_logprobs": dl, "p_ids": di, "p_stats": "*fp32", "p_coef": "*fp32",
                       "p_grad_student": ds,
                       **ints(["stride_student_b", "stride_student_t"] + slots + ["stride_gs_b", "stride_gs_t",
                              "length", "stride_stats_k", "stride_stats_n", "stride_coef", "width_student",
                              "vocab_size", "num_slots"]), **scalars,
                       "DIVERGENCE": "constexpr", "TAIL": "constexpr", "SOFT_BF16": "constexpr",
                       "BLOCK_V": "constexpr", "BLOCK_K": "constexpr"}
                k = triton.compile(ASTSource(tk._topk_backward_kernel, sig, constexprs={
                    "DIVERGENCE": div, "TAIL": tail, "SOFT_BF16": False, "BLOCK_V": 4096, "BLOCK_K": block_k}),
                    target=target, options={"num_warps": 8})
                results.append(dict(kernel="backward", div=div, tail=tail, dtypes=[ds, dl, di], block_k=block_k,
                                    warps=8, i64=i64_rows(k.asm["ttir"], ["s", "lq", "id", "gs"]),
                                    **resources(k)))
    found = {op: [getattr(k, "fn", k).__name__ for k in get_triton_kernels_for_op(f"topd::triton_topk_{op}")]
             for op in ("forward", "backward")}
    print("RESULTS" + json.dumps(dict(kernels=results, found=found)))
""")


def _can_compile_for_cuda():
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for real by the GPU tests on a CUDA machine")
@pytest.mark.skipif(not _can_compile_for_cuda(), reason="this triton has no NVIDIA backend / bundled ptxas")
def test_kernels_compile_for_sm90_without_spills():
    """Every variant (divergence x tail x two (dtypes, BLOCK_K 32 / 256) pairs) compiles for sm_90 with no
    spills, the row offsets in 64 bits, and torch.library.triton_op finds the kernels in the ops' bodies."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULTS", 1)[1])
    assert out["found"] == {"forward": ["_topk_forward_kernel"], "backward": ["_topk_backward_kernel"]}, out["found"]
    results = out["kernels"]
    assert len(results) == 24
    for r in results:
        print(r)
        assert r["i64"], f"row offset not computed in 64 bits: {r}"
        assert r.get("LOCAL", 0) == 0 and r.get("STACK", 0) == 0, f"register spills: {r}"
        assert 0 < r["REG"] <= 255, r
