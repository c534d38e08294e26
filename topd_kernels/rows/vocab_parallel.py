"""Vocabulary-parallel rows (SPEC "Vocabulary-parallel"): a backend's row ops on one rank's columns, combined
across a `torch.distributed` group into the statistics of the whole rows.

Rank r of a group of P holds columns [r V_r, (r + 1) V_r) of both models' logits (Megatron's column-parallel
output layer), the same width V_r on every rank; `vocab_size` counts global columns, so a rank has
clamp(vocab_size - r V_r, 0, V_r) real columns. Its row ops produce the statistics of its shard (contract.Stat
over its real columns: maxima m_r, log-sums l_r, divergence d_r); all-reduces of O(N) floats combine them into
the statistics of the whole rows, the same on every rank, from which every rank runs the same window step. The
backward needs no change: given the whole rows' MAX, LOGSUM, KL, MIX_S and MIX_T, a backend's backward writes
the exact gradient of the rank's own columns (contract.py, "Gradients").

The combination, per row (student s, teacher t, temperature tau):
    M_s = max_r m_s,r                            all-reduce MAX of (MAX_S, MAX_T)
    a_r = l_s,r + (m_s,r - M_s) / tau            log of the shard's student mass, in units of exp(M_s / tau);
                                                 -inf for a shard without mass (no real column, or all -inf)
    S = sum_r exp(a_r)                           MAX_S = M_s, LOGSUM_S = log S; b_r, T and the rest likewise
                                                 for the teacher. exp(a_r) / S = pi_r, the shard's share.
    entropy     H = sum_r pi_r (H_r - log pi_r) = (sum_r exp(a_r) (H_r - a_r)) / S + log S
    reverse_kl  d = sum_r pi_r (d_r + log pi_r - log rho_r) = X / S - log S + log T,
                X = sum_r exp(a_r) (d_r + a_r - b_r)
    forward_kl  the mirror image: X = sum_r exp(b_r) (d_r + b_r - a_r), d = X / T - log T + log S
                                                 all-reduce SUM of (exp a_r, exp b_r, H term, X_r)
    jsd         log m needs the whole rows' normalisers: with MAX and LOGSUM combined (one pass over each
                shard, the reverse_kl forward's), each rank sums K_s and K_t over its columns (the backend's
                `mix` op, a second pass), all-reduce SUM; d = beta K_t + (1 - beta) K_s.
A shard without mass adds nothing; one with mass where the other model has none (b_r = -inf < a_r for
reverse_kl), or with d_r = +inf, makes d = +inf, as in the single-process call. Rows whose mask is False
are exact zeros.

Communication per row and call: 6 floats in two all-reduces (KL), 7 floats in three (jsd): 24 / 28 bytes,
whatever V. Widths are compared across the group once per (group, widths) (`_check_widths`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import JSD, REVERSE_KL
from .contract import NUM_STATS, RowCall, RowOps, Stat

_CHECKED: set = set()  # (group, student width, teacher width) found equal on every rank of the group


def group_size(group) -> Optional[int]:
    """P, the number of ranks of `group` (None without a group). A ValueError / TypeError naming
    vocab_parallel_group when torch.distributed is not initialised, or `group` is not a process group this
    process belongs to."""
    if group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel_group: torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group: expected a torch.distributed process group, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("vocab_parallel_group: this process is not a member of the group")
    return dist.get_world_size(group)


def _check_widths(group, student_width: int, teacher_width: int, device: torch.device) -> None:
    """ValueError, on every rank alike, unless both models' logits have one width on every rank of the group.
    A collective of four integers, run once per (group, widths)."""
    key = (group, student_width, teacher_width)
    if key in _CHECKED:
        return
    extremes = torch.tensor([student_width, -student_width, teacher_width, -teacher_width], device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    widest_s, minus_narrowest_s, widest_t, minus_narrowest_t = extremes.tolist()
    narrowest_s, narrowest_t = -minus_narrowest_s, -minus_narrowest_t
    if widest_s != narrowest_s or widest_t != narrowest_t or widest_s != widest_t:
        raise ValueError(
            f"vocab_parallel_group: every rank must hold the same number of columns of both models' logits; the "
            f"student's widths range over [{narrowest_s}, {widest_s}] and the teacher's over "
            f"[{narrowest_t}, {widest_t}] across the group"
        )
    _CHECKED.add(key)


class VocabParallelOps(NamedTuple):
    """A backend's row ops on this rank's columns, with the interface of RowOps the loss uses: `forward`
    returns the whole rows' statistics (the same on every rank), `backward_into` writes the gradient of the
    rank's columns. has_columns False: every column of the rank is padding, and its row ops are never called."""

    ops: RowOps
    group: object
    has_columns: bool

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor, call: RowCall) -> Tensor:
        if not self.has_columns:
            local = _no_mass(mask.numel(), student.device)
        elif call.divergence == JSD:  # MAX and LOGSUM only: one pass (jsd's own second pass needs them global)
            local = self.ops.forward(student, teacher, mask, call._replace(divergence=REVERSE_KL, beta=0.5))
        else:
            local = self.ops.forward(student, teacher, mask, call)
        stats = _combine_normalisers(local, call, self.group)
        if call.divergence == JSD:
            mixes = self.ops.mix(student, teacher, mask, stats, call) if self.has_columns \
                else stats.new_zeros((2, mask.numel()))
            dist.all_reduce(mixes, group=self.group)
            stats[Stat.MIX_S], stats[Stat.MIX_T] = mixes
            stats[Stat.KL] = call.beta * mixes[1] + (1 - call.beta) * mixes[0]
        return torch.where(mask, stats, torch.zeros_like(stats))

    def backward_into(self, student, teacher, stats, coef, call: RowCall, grad_student, grad_teacher) -> None:
        if self.has_columns:
            self.ops.backward_into(student, teacher, stats, coef, call, grad_student, grad_teacher)
            return
        for grad in (grad_student, grad_teacher):
            if grad is not None:
                grad.zero_()


def on_shard(ops: RowOps, group, student: Tensor, teacher: Tensor, vocab_size: int) -> tuple:
    """(VocabParallelOps of `ops` on this rank's columns, the vocab_size of its row call) for the rows of one
    rank, (B, T, V_r) each, and the global vocab_size. A ValueError on every rank when the widths differ across
    the group or vocab_size exceeds P V_r. A rank without real columns gets a call naming all its columns,
    which no row op reads."""
    width = student.shape[-1]
    _check_widths(group, width, teacher.shape[-1], student.device)
    ranks = dist.get_world_size(group)
    if vocab_size > ranks * width:
        raise ValueError(f"vocab_size: {vocab_size} is larger than the vocabulary of the group "
                         f"({ranks} ranks x {width} columns)")
    columns = min(max(vocab_size - dist.get_rank(group) * width, 0), width)
    return VocabParallelOps(ops, group, columns > 0), columns or width


def _no_mass(n: int, device: torch.device) -> Tensor:
    """The statistics of a shard without real columns: no mass (MAX = -inf), no divergence."""
    stats = torch.zeros(NUM_STATS, n, dtype=torch.float32, device=device)
    stats[[Stat.MAX_S, Stat.MAX_T]] = float("-inf")
    return stats


def _cross_term(log_mass_p: Tensor, log_mass_q: Tensor, d: Tensor) -> Tensor:
    """exp(a_r) (d_r + a_r - b_r) of KL(p || q) for this shard (a: p's log mass, b: q's): 0 without p-mass,
    +inf where p has mass and q none or d_r = +inf."""
    alive = log_mass_p > float("-inf")
    infinite = alive & ((log_mass_q == float("-inf")) | (d == float("inf")))
    finite = torch.where(alive & ~infinite, log_mass_p.exp() * (d + log_mass_p - log_mass_q), 0.0)
    return torch.where(infinite, float("inf"), finite)


def _combine_normalisers(local: Tensor, call: RowCall, group) -> Tensor:
    """(NUM_STATS, N) statistics of the whole rows from this shard's: MAX_* and LOGSUM_* combined, and for
    reverse / forward KL the divergence (two all-reduces); MIX_* are zero (jsd: `VocabParallelOps.forward`)."""
    local_max = local[[Stat.MAX_S, Stat.MAX_T]]
    maxima = local_max.clone()
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    shifted = local[[Stat.LOGSUM_S, Stat.LOGSUM_T]] + (local_max - maxima) / call.temperature
    log_mass = torch.where(local_max == float("-inf"), float("-inf"), shifted)  # (a_r, b_r)
    # The student's entropy: H = sum_r pi_r (H_r - log pi_r) = (sum_r exp(a_r) (H_r - a_r)) / S + log S.
    student_mass = log_mass[0]
    entropy = torch.where(student_mass > float("-inf"),
                          student_mass.exp() * (local[Stat.ENTROPY_S] - student_mass), 0.0)
    sums = torch.cat((log_mass.exp(), entropy[None]))
    if call.divergence != JSD:
        p, q = (0, 1) if call.divergence == REVERSE_KL else (1, 0)
        sums = torch.cat((sums, _cross_term(log_mass[p], log_mass[q], local[Stat.KL])[None]))
    dist.all_reduce(sums, group=group)
    log_sums = sums[:2].log()  # (log S, log T)
    stats = torch.zeros_like(local)
    stats[Stat.MAX_S], stats[Stat.MAX_T] = maxima
    stats[Stat.LOGSUM_S], stats[Stat.LOGSUM_T] = log_sums
    stats[Stat.ENTROPY_S] = sums[2] / sums[0] + log_sums[0]
    if call.divergence != JSD:
        stats[Stat.KL] = sums[3] / sums[p] - log_sums[p] + log_sums[q]
    return stats
