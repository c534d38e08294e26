"""Triton backend of the top-k teacher rows (`contract.py`, "Top-k teacher rows"; SPEC "Top-k teacher"):
`topk_forward` / `topk_backward`, registered as the ops `topd::triton_topk_forward` /
`topd::triton_topk_backward` (`OPS`). The oracle is torch_rows.topk_forward / topk_backward: the same
arithmetic, in float32, one program per row instead of chunks of rows.

The teacher is k (log-probability, id) slots per row instead of a logits row. Tensors (the contract):
student (B, T, Vs) float32 / bfloat16 / float16 with any strides on the first two dims and a unit last
stride (read in place, only its first V = vocab_size columns); teacher logprobs (B, T, k) of any float
dtype and ids (B, T, k) int32 / int64, each with any strides on all three dims (a view of the user's
tensors is read in place); grad_student (B, T, Vs) with strides of its own on the first two dims. Every
row offset is computed in int64 ((b, t) = divmod(i, T), then b * stride_b + t * stride_t, as triton_rows),
the slot offsets k * stride_k too. Slot j is live when its log-probability is > -inf; a padding slot's id is
never loaded, let alone used as an address (every slot gather and scatter is masked by liveness).

One program per row; the k slots are one block of BLOCK_K = next power of two >= max(k, 16) lanes (k is
small in practice: an inference server's top-k; a very large k costs registers, as a full row would).
The tail ("bucket" / "renormalize", config.TAIL_CODES) and the divergence select code (constexprs).
The forward streams the student's row once for both tails (the entropy; bucket's normalisers and tail mass
too); the bucket forward also gets each row's live ids sorted (an (N, k) int32 tensor the launcher makes with
torch.sort) to tell the slot columns apart while streaming. Launch configuration, autotuning (every kernel
that streams a row: the forward, the bucket backward) and the output rounding are triton_rows'
(`_launch_config`, `_kernel`, `_launch_options`, `_to_output`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..config import BUCKET, RENORMALIZE
from .contract import NUM_STATS, Stat, TopKCall, define_topk_ops
from .torch_rows import TAIL_FLOOR
from .triton_rows import (_FORWARD_KL, _JSD, _KL, _LOGSUM_S, _LOGSUM_T, _MAX_S, _MAX_T, _MIX_S, _MIX_T,
                          _REVERSE_KL, INTERPRETED, _kernel, _launch_config, _launch_options, _on_device,
                          _row_start, _row_strides, _scalars, _to_output)

__all__ = ["topk_forward", "topk_backward", "OPS"]

# The tail selects code inside the kernels (a constexpr); the codes are config.TAIL_CODES.
_BUCKET: tl.constexpr = tl.constexpr(BUCKET)
_RENORMALIZE: tl.constexpr = tl.constexpr(RENORMALIZE)
# Both tails are floored at 1e-7 (SPEC; torch_rows.TAIL_FLOOR): float32 1e-7 in both backends.
_TAIL_FLOOR: tl.constexpr = tl.constexpr(TAIL_FLOOR)
# The statistics rows triton_rows does not name (contract.Stat).
_ENTROPY_S: tl.constexpr = tl.constexpr(int(Stat.ENTROPY_S))
_TAIL_S: tl.constexpr = tl.constexpr(int(Stat.TAIL_S))
# BLOCK_K is at least this (small blocks gain nothing and would only add compiled variants).
MIN_BLOCK_K = 16


# ---------------------------------------------------------------------------------------------------
# The math (derivation: contract.py, "Top-k teacher rows"; a = z_s / tau, V = vocab_size)
# ---------------------------------------------------------------------------------------------------
# The student's row, streamed once (both tails; `_student_pass`): the online max / sum-exp of triton_rows
# (maxima on the raw logits M, only shifted differences scaled: l = (z - M) / tau, e = exp(l), L = sum e),
# and with them
#     S1 = sum e l, for the entropy H = log L - S1 / L (ENTROPY_S). When the running max moves to M', every e
#          is multiplied by alpha = exp((M - M') / tau) and every l shifts by -(M' - M) / tau, so (as the KL
#          cross term of triton_rows) S1' = alpha (S1 - L (M' - M) / tau) + sum_block e' l'. Every term is <= 0
#          (l <= 0, M' >= M): no cancellation, H = log L + (-S1 / L) a sum of two terms >= 0. Entries at -inf
#          add 0 (tl.where, never 0 * inf); a row of -inf (L = 0) gets H = 0, as torch_rows.
#     L_rest = sum of e over the columns that are not live slots (bucket), rescaled by alpha like L, and
#          R = L_rest / L = TAIL_S: the tail summed directly, never 1 - sum_S P_j (contract.py, "Precision").
#          Membership: the launcher sorts each row's live ids (padding -> the sentinel V, after them); the kernel
#          keeps the next one, b_next, as a scalar. A block [v0, v0 + BLOCK_V) whose end b_next has not reached
#          holds no live id and adds its whole e sum to L_rest (one scalar compare: the common case for k << V
#          / BLOCK_V blocks). Otherwise a loop steps b_next through the block's ids (sorted: they are the next
#          ones), zeroing each one's e (a vector compare and select of BLOCK_V columns; one scalar id loaded a
#          step), then sums what is left. Per row: k such steps in all (k * BLOCK_V compares) whatever the ids'
#          distribution, a masked block sum per block holding an id, no per-block reduction otherwise.
#          (Compared at sm_90, bf16, BLOCK_V 4096, 8 warps: about 46 instructions per id and 47 per block over
#          the pass without membership (about 430 per block); counting each block's ids over BLOCK_K lanes
#          instead cost a cross-warp reduction per block and about 140 per block.) 1 - sum_S P_j, or L minus the
#          slots' e, would cancel; a (BLOCK_V, k) compare would cost k * V per row.
# Categories of a row: the live slots S (log P_j, log Q_j) plus, for "bucket", the tail.
#     bucket       MAX_S = max_v z_v, LOGSUM_S = log L over the V columns; log P_j = (z_{id_j} - MAX_S) / tau
#                  - LOGSUM_S, log Q_j = logprob_j, P_tail = max(R, 1e-7), Q_tail = max(1 - sum_S Q_j, 1e-7)
#                  (as logs).
#     renormalize  MAX_S, LOGSUM_S over the live slots' logits only (0, 0 with S empty), log P_j as above
#                  (= log softmax over S), log Q_j = logprob_j - logsumexp_S(logprob); R = 0. (The row's
#                  own max and sum serve only the entropy.)
# d over the categories, with P = exp(log P), Q = exp(log Q) and every P (...) with P == 0 equal to 0:
#     reverse_kl  sum P (log P - log Q)
#     forward_kl  sum Q (log Q - log P)             (+inf when Q_j > 0 = P_j: a live slot at z = -inf)
#     jsd         beta K_q + (1 - beta) K_p, K_p = sum P (log P - log M), K_q = sum Q (log Q - log M),
#                 log M = logaddexp(log(1 - beta) + log P, log(beta) + log Q)
# Stored: MAX_S, LOGSUM_S, KL = d, ENTROPY_S = H, TAIL_S = R (bucket; 0 for renormalize); the other
# statistics 0; masked rows read nothing and store exact zeros in every statistic.
#
# Backward: the categories again, from the k slots and the stored MAX_S, LOGSUM_S, TAIL_S (the forward's very
# float32 numbers and expressions, so the tail is the same number). Weights W_c = P_c g_c (g_c = dd/dP_c):
#     reverse_kl  P (log P - log Q + 1),   forward_kl  -Q,   jsd  (1 - beta) P (log P - log M)
#     f = 1 where the tail is free (bucket, R > 1e-7), else 0 (an active floor; renormalize has no tail),
#     g_tail = f W_tail / P_tail, G = sum_S W_j + f W_tail - g_tail
#     bucket       dd/da_v = -p_v G at every column that is not a slot (p_v = exp((z_v - MAX_S) / tau - LOGSUM_S))
#     both         dd/da_v = W_j - P_j (sum_S W_i + f W_tail) at the slot id_j (no g_tail at a slot)
#     renormalize  dd/da_v = 0 off the slots
# written as coef / tau * dd/da (dd/dz = dd/da / tau), zeros past V, exact zeros on rows with coef == 0
# (which read nothing). The dense pass stores every column (-p_v G at the slots' columns too: no membership
# test); after a barrier (the dense stores of all threads of the program ordered before it) a masked scatter
# overwrites the slots' columns with their full values.
#
# Precision: R is a float32 sum of positive terms (relative accuracy), so P_tail, the floor's test and g_tail
# are as accurate as the row's other probabilities, whatever the slots hold (contract.py's note): forward_kl's
# Q_tail / P_tail no longer multiplies a cancellation error (tests/test_triton_topk.py,
# test_forward_kl_student_mass_outside_the_slots).
@triton.jit
def _load_slots(p_s_row, p_lq_row, p_id_row, stride_lq_k, stride_id_k, num_slots, b_read, BLOCK_K: tl.constexpr):
    """The k slots of one row (BLOCK_K lanes): (log q float32, -inf on padding and unused lanes; live mask;
    ids, 0 where not live; the student's logits at the live ids, float32, -inf elsewhere). b_read False:
    nothing is read (every slot padding)."""
    neg_inf = float("-inf")
    o_k = tl.arange(0, BLOCK_K).to(tl.int64)
    # (not (o_k < num_slots) & b_read: the interpreter turns a block mask & a scalar bool into uint8, which
    # tl.load refuses as a mask)
    m_slot = o_k < tl.where(b_read, num_slots, 0)
    b_lq = tl.load(p_lq_row + o_k * stride_lq_k, mask=m_slot, other=neg_inf).to(tl.float32)
    m_live = b_lq > neg_inf  # a NaN log-probability counts as padding, as in torch_rows
    b_id = tl.load(p_id_row + o_k * stride_id_k, mask=m_live, other=0)  # a padding slot's id is never read
    b_z = tl.load(p_s_row + b_id, mask=m_live, other=neg_inf).to(tl.float32)
    return b_lq, m_live, b_id, b_z


@triton.jit
def _student_pass(p_s_row, p_sorted_row, b_end, vocab_size, b_num_sorted, inv_temperature, BLOCK_V: tl.constexpr,
                  REST: tl.constexpr):
    """One pass over the student's columns [0, b_end) (derivation above): (M = max z, L = sum e, S1 = sum e l,
    L_rest = sum e over the columns that are not live slots). REST (bucket): compute L_rest (else 0) from the row's
    live ids sorted at p_sorted_row (the sentinel V after them), of which b_num_sorted entries are read."""
    neg_inf = float("-inf")
    o_v = tl.arange(0, BLOCK_V)
    b_max = tl.full((), neg_inf, tl.float32)  # running max of the raw logits z
    b_sum = tl.zeros((), tl.float32)  # L = sum exp((z - b_max) / tau)
    b_cross = tl.zeros((), tl.float32)  # S1 = sum e l, relative to the current max
    b_rest = tl.zeros((), tl.float32)  # L_rest: L over the columns that are not live slots
    b_j = tl.zeros((), tl.int32)  # sorted ids passed so far
    if REST:
        b_next = tl.load(p_sorted_row + b_j, mask=b_j < b_num_sorted, other=vocab_size)  # the next live id (or V)
    else:
        b_next = vocab_size  # unused
    for v0 in tl.range(0, b_end, BLOCK_V):
        o_col = v0 + o_v
        b_z = tl.load(p_s_row + o_col, mask=o_col < vocab_size, other=neg_inf).to(tl.float32)
        b_new_max = tl.maximum(b_max, tl.max(b_z, axis=0))
        # alpha = exp(M - M'); 1 while the max is still -inf (the sums are 0 then)
        b_alpha = tl.where(b_new_max == neg_inf, 1.0, tl.exp((b_max - b_new_max) * inv_temperature))
        b_l = (b_z - b_new_max) * inv_temperature  # shifted log-weights (-inf where z = -inf)
        b_e = tl.where(b_z == neg_inf, 0.0, tl.exp(b_l))
        # S1' = alpha (S1 - L (M' - M) / tau) + block terms (L > 0 exactly when M is finite: no inf * 0)
        b_shift = tl.where(b_sum > 0, b_sum * ((b_new_max - b_max) * inv_temperature), 0.0)
        b_cross = b_alpha * (b_cross - b_shift) + tl.sum(tl.where(b_z == neg_inf, 0.0, b_e * b_l), axis=0)
        b_block = tl.sum(b_e, axis=0)
        b_sum = b_alpha * b_sum + b_block
        if REST:
            # The live ids in this block are the sorted ones from b_next on below the block's end, which is at most
            # V (so the sentinel V ends the loop): zero their e, one id a step; a block without one adds its sum.
            b_block_end = tl.minimum(v0 + BLOCK_V, vocab_size)
            if b_next < b_block_end:
                b_e_rest = b_e
                while b_next < b_block_end:
                    # o_v == id - v0 rather than o_col == id: the columns then need no registers of their own
                    # (which made ptxas shuttle the 16 compares of a thread through P2R: 83 instead of 46 per id)
                    b_e_rest = tl.where(o_v == b_next - v0, 0.0, b_e_rest)
                    b_j += 1
                    b_next = tl.load(p_sorted_row + b_j, mask=b_j < b_num_sorted, other=vocab_size)
                b_rest_block = tl.sum(b_e_rest, axis=0)
            else:
                b_rest_block = b_block
            b_rest = b_alpha * b_rest + b_rest_block
        b_max = b_new_max
    return b_max, b_sum, b_cross, b_rest


@triton.jit
def _categories(b_z, b_lq, m_live, b_max, b_log_sum, b_rest, inv_temperature, TAIL: tl.constexpr):
    """(log P (BLOCK_K), log Q (BLOCK_K), log P_tail, log Q_tail) of one row, -inf off the live slots; b_rest = R,
    the student's mass outside the live slots (bucket). renormalize: log Q renormalised over S; the tail values
    are placeholders (-inf, -inf)."""
    neg_inf = float("-inf")
    b_lp = tl.where(m_live, (b_z - b_max) * inv_temperature - b_log_sum, neg_inf)
    if TAIL == _BUCKET:
        b_lp_tail = tl.log(tl.maximum(b_rest, _TAIL_FLOOR))
        b_lq_tail = tl.log(tl.maximum(1.0 - tl.sum(tl.exp(b_lq), axis=0), _TAIL_FLOOR))
    else:
        # log Q_j = log q_j - logsumexp_S(log q) (torch.logsumexp; 0 for an empty S)
        b_q_max = tl.max(b_lq, axis=0)
        b_q_shift = tl.where(b_q_max == neg_inf, 0.0, b_q_max)
        b_lse_q = tl.log(tl.sum(tl.exp(b_lq - b_q_shift), axis=0)) + b_q_shift
        b_lq = b_lq - tl.where(b_lse_q == neg_inf, 0.0, b_lse_q)
        b_lp_tail = tl.full((), neg_inf, tl.float32)
        b_lq_tail = tl.full((), neg_inf, tl.float32)
    return b_lp, b_lq, b_lp_tail, b_lq_tail


@triton.jit
def _p_log_ratio(b_lp, b_lq):
    """p (log p - log q) with p = exp(log p); 0 where p == 0 (never 0 * inf)."""
    b_p = tl.exp(b_lp)
    return tl.where(b_p > 0, b_p * (b_lp - b_lq), 0.0)


@triton.jit
def _log_mix(b_lp, b_lq, log_one_minus_beta, log_beta):
    """log M = logaddexp(log(1 - beta) + log P, log(beta) + log Q); -inf when both are -inf."""
    b_x_p = b_lp + log_one_minus_beta
    b_x_q = b_lq + log_beta
    b_hi = tl.maximum(b_x_p, b_x_q)
    b_lo = tl.minimum(b_x_p, b_x_q)
    return tl.where(b_hi == float("-inf"), float("-inf"), b_hi + tl.log(1.0 + tl.exp(b_lo - b_hi)))


@triton.jit
def _divergence(b_lp, b_lq, b_lp_tail, b_lq_tail, beta, log_one_minus_beta, log_beta, DIVERGENCE: tl.constexpr,
                TAIL: tl.constexpr):
    """d over the categories: the slots (BLOCK_K lanes) and, for bucket, the tail."""
    if DIVERGENCE == _REVERSE_KL:
        b_d = tl.sum(_p_log_ratio(b_lp, b_lq), axis=0)
        if TAIL == _BUCKET:
            b_d += _p_log_ratio(b_lp_tail, b_lq_tail)
    elif DIVERGENCE == _FORWARD_KL:
        b_d = tl.sum(_p_log_ratio(b_lq, b_lp), axis=0)
        if TAIL == _BUCKET:
            b_d += _p_log_ratio(b_lq_tail, b_lp_tail)
    else:
        b_lm = _log_mix(b_lp, b_lq, log_one_minus_beta, log_beta)
        b_k_p = tl.sum(_p_log_ratio(b_lp, b_lm), axis=0)
        b_k_q = tl.sum(_p_log_ratio(b_lq, b_lm), axis=0)
        if TAIL == _BUCKET:
            b_lm_tail = _log_mix(b_lp_tail, b_lq_tail, log_one_minus_beta, log_beta)
            b_k_p += _p_log_ratio(b_lp_tail, b_lm_tail)
            b_k_q += _p_log_ratio(b_lq_tail, b_lm_tail)
        b_d = beta * b_k_q + (1.0 - beta) * b_k_p
    return b_d


@triton.jit
def _weights(b_lp, b_lq, beta, log_one_minus_beta, log_beta, DIVERGENCE: tl.constexpr):
    """W = P g = P dd/dP per category (torch_rows._category_weights); 0 off the live slots."""
    b_p = tl.exp(b_lp)
    if DIVERGENCE == _REVERSE_KL:
        b_w = tl.where(b_p > 0, ((b_lp - b_lq) + 1.0) * b_p, 0.0)
    elif DIVERGENCE == _FORWARD_KL:
        b_w = -tl.exp(b_lq)
    else:
        b_lm = _log_mix(b_lp, b_lq, log_one_minus_beta, log_beta)
        b_w = tl.where(b_p > 0, (b_lp - b_lm) * b_p, 0.0) * (1.0 - beta)
    return b_w


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _topk_forward_kernel(
    p_student,  # *fp32/bf16/fp16: student logits (B, T, Vs); row (b, t) at b * stride_student_b + t * stride_student_t
    p_logprobs,  # *float: teacher log-probabilities (B, T, k); slot (b, t, j) at b * s_b + t * s_t + j * s_k
    p_ids,  # *i32/i64: teacher token ids (B, T, k), read only where the log-probability is > -inf
    p_sorted,  # *i32 (N, k): each row's live ids sorted, V at padding (bucket; unused by renormalize)
    p_mask,  # *u8 (N,): the row mask (bool viewed as uint8); entry i at i * stride_mask
    p_stats,  # *fp32 (NUM_STATS, N) output, rows contract.Stat; (k, i) at k * stride_stats_k + i * stride_stats_n
    stride_student_b,  # int: elements between consecutive batch entries of the student
    stride_student_t,  # int: elements between consecutive positions of the student (last dim has stride 1)
    stride_logprobs_b,  # int: elements between consecutive batch entries of logprobs
    stride_logprobs_t,  # int: elements between consecutive positions of logprobs
    stride_logprobs_k,  # int: elements between consecutive slots of logprobs
    stride_ids_b,  # int: elements between consecutive batch entries of ids
    stride_ids_t,  # int: elements between consecutive positions of ids
    stride_ids_k,  # int: elements between consecutive slots of ids
    stride_sorted_n,  # int: elements between consecutive rows of p_sorted (its last dim has stride 1)
    length,  # int: T, positions per batch entry (row i is (i // T, i % T))
    stride_mask,  # int: elements between consecutive mask entries
    stride_stats_k,  # int: elements between the NUM_STATS stats rows
    stride_stats_n,  # int: elements between consecutive entries of a stats row
    vocab_size,  # int: V, the student's columns read; every live id is in [0, V)
    num_slots,  # int: k, slots per row (<= BLOCK_K)
    inv_temperature,  # fp32: 1 / tau (the student's only)
    beta,  # fp32: jsd mixture weight of the teacher (unused otherwise)
    log_one_minus_beta,  # fp32: log(1 - beta) (jsd only)
    log_beta,  # fp32: log(beta) (jsd only)
    DIVERGENCE: tl.constexpr,  # config.DIVERGENCE_CODES: 0 reverse_kl, 1 forward_kl, 2 jsd (selects code)
    TAIL: tl.constexpr,  # config.TAIL_CODES: 0 bucket (the row's normalisers and tail), 1 renormalize (the slots')
    BLOCK_V: tl.constexpr,  # columns per block of the row pass (power of two)
    BLOCK_K: tl.constexpr,  # slot lanes (power of two >= k)
):
    i_n = tl.program_id(0).to(tl.int64)  # row index; int64 so that the row offsets cannot overflow
    i_b = i_n // length  # batch entry of the row
    i_t = i_n % length  # position of the row
    p_s_row = _row_start(p_student, i_b, i_t, stride_student_b, stride_student_t)
    p_lq_row = _row_start(p_logprobs, i_b, i_t, stride_logprobs_b, stride_logprobs_t)
    p_id_row = _row_start(p_ids, i_b, i_t, stride_ids_b, stride_ids_t)
    p_sorted_row = p_sorted + i_n * stride_sorted_n
    b_valid = tl.load(p_mask + i_n * stride_mask) != 0  # masked rows read nothing
    b_end = tl.where(b_valid, vocab_size, 0)  # columns read: none on a masked row
    neg_inf = float("-inf")

    b_num_sorted = tl.where(b_valid, num_slots, 0)  # sorted ids read (bucket): none on a masked row
    b_max_row, b_sum_row, b_cross_row, b_rest_row = _student_pass(p_s_row, p_sorted_row, b_end, vocab_size,
                                                                  b_num_sorted, inv_temperature, BLOCK_V,
                                                                  TAIL == _BUCKET)
    b_log_sum_row = tl.log(b_sum_row)
    # H = log L - S1 / L; 0 on a row of -inf (and on masked rows, replaced below anyway)
    b_entropy = tl.where(b_sum_row > 0, b_log_sum_row - b_cross_row / b_sum_row, 0.0)

    b_lq, m_live, b_id, b_z = _load_slots(p_s_row, p_lq_row, p_id_row, stride_logprobs_k, stride_ids_k, num_slots,
                                          b_valid, BLOCK_K)
    if TAIL == _BUCKET:
        b_max = b_max_row
        b_log_sum = b_log_sum_row
        b_rest = tl.where(b_sum_row > 0, b_rest_row / b_sum_row, 0.0)  # R = TAIL_S
    else:
        # The normalisers of the live slots' logits (0, 0 when S is empty); R = 0.
        b_any = tl.max(m_live.to(tl.int32), axis=0) > 0
        b_max = tl.where(b_any, tl.max(tl.where(m_live, b_z, neg_inf), axis=0), 0.0)
        b_e = tl.where(m_live & (b_z > neg_inf), tl.exp((b_z - b_max) * inv_temperature), 0.0)
        b_log_sum = tl.where(b_any, tl.log(tl.sum(b_e, axis=0)), 0.0)
        b_rest = tl.zeros((), tl.float32)

    b_lp, b_lq, b_lp_tail, b_lq_tail = _categories(b_z, b_lq, m_live, b_max, b_log_sum, b_rest, inv_temperature, TAIL)
    b_d = _divergence(b_lp, b_lq, b_lp_tail, b_lq_tail, beta, log_one_minus_beta, log_beta, DIVERGENCE, TAIL)

    # Every statistic of the row, exact zeros on masked rows (their loop ran no step: -inf max, -inf logsum).
    p_out = p_stats + i_n * stride_stats_n
    tl.store(p_out + _MAX_S * stride_stats_k, tl.where(b_valid, b_max, 0.0))
    tl.store(p_out + _LOGSUM_S * stride_stats_k, tl.where(b_valid, b_log_sum, 0.0))
    tl.store(p_out + _KL * stride_stats_k, tl.where(b_valid, b_d, 0.0))
    tl.store(p_out + _ENTROPY_S * stride_stats_k, tl.where(b_valid, b_entropy, 0.0))
    tl.store(p_out + _TAIL_S * stride_stats_k, tl.where(b_valid, b_rest, 0.0))
    b_zero = tl.zeros((), tl.float32)
    tl.store(p_out + _MAX_T * stride_stats_k, b_zero)
    tl.store(p_out + _LOGSUM_T * stride_stats_k, b_zero)
    tl.store(p_out + _MIX_S * stride_stats_k, b_zero)
    tl.store(p_out + _MIX_T * stride_stats_k, b_zero)


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _topk_backward_kernel(
    p_student,  # *fp32/bf16/fp16: student logits (B, T, Vs); row (b, t) at b * stride_student_b + t * stride_student_t
    p_logprobs,  # *float: teacher log-probabilities (B, T, k); slot (b, t, j) at b * s_b + t * s_t + j * s_k
    p_ids,  # *i32/i64: teacher token ids (B, T, k), read only where the log-probability is > -inf
    p_stats,  # *fp32 (NUM_STATS, N) from topk_forward (contract.Stat); (k, i) at k * stride_k + i * stride_n
    p_coef,  # *fp32 (N,): per-row multiplier; entry i at i * stride_coef
    p_grad_student,  # *dtype of student: (B, T, Vs) output; row (b, t) at b * stride_gs_b + t * stride_gs_t
    stride_student_b,  # int: elements between consecutive batch entries of the student
    stride_student_t,  # int: elements between consecutive positions of the student (last dim has stride 1)
    stride_logprobs_b,  # int: elements between consecutive batch entries of logprobs
    stride_logprobs_t,  # int: elements between consecutive positions of logprobs
    stride_logprobs_k,  # int: elements between consecutive slots of logprobs
    stride_ids_b,  # int: elements between consecutive batch entries of ids
    stride_ids_t,  # int: elements between consecutive positions of ids
    stride_ids_k,  # int: elements between consecutive slots of ids
    stride_gs_b,  # int: elements between consecutive batch entries of grad_student
    stride_gs_t,  # int: elements between consecutive positions of grad_student (last dim has stride 1)
    length,  # int: T, positions per batch entry (row i is (i // T, i % T))
    stride_stats_k,  # int: elements between the NUM_STATS stats rows
    stride_stats_n,  # int: elements between consecutive entries of a stats row
    stride_coef,  # int: elements between consecutive coef entries
    width_student,  # int: Vs, last dim of student and grad_student (columns >= vocab_size are zero-filled)
    vocab_size,  # int: V, columns that carry gradient; every live id is in [0, V)
    num_slots,  # int: k, slots per row (<= BLOCK_K)
    inv_temperature,  # fp32: 1 / tau (the student's only)
    beta,  # fp32: jsd mixture weight of the teacher (unused otherwise)
    log_one_minus_beta,  # fp32: log(1 - beta) (jsd only)
    log_beta,  # fp32: log(beta) (jsd only)
    DIVERGENCE: tl.constexpr,  # config.DIVERGENCE_CODES: 0 reverse_kl, 1 forward_kl, 2 jsd (selects code)
    TAIL: tl.constexpr,  # config.TAIL_CODES: 0 bucket (gradient on every column), 1 renormalize (the slots only)
    SOFT_BF16: tl.constexpr,  # round fp32 -> bf16 by hand (True only under the interpreter, which truncates)
    BLOCK_V: tl.constexpr,  # columns per block of the dense pass (power of two)
    BLOCK_K: tl.constexpr,  # slot lanes (power of two >= k)
):
    i_n = tl.program_id(0).to(tl.int64)  # row index; int64 offsets
    i_b = i_n // length  # batch entry of the row
    i_t = i_n % length  # position of the row
    p_s_row = _row_start(p_student, i_b, i_t, stride_student_b, stride_student_t)
    p_lq_row = _row_start(p_logprobs, i_b, i_t, stride_logprobs_b, stride_logprobs_t)
    p_id_row = _row_start(p_ids, i_b, i_t, stride_ids_b, stride_ids_t)
    p_gs_row = _row_start(p_grad_student, i_b, i_t, stride_gs_b, stride_gs_t)
    o_v = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    b_coef = tl.load(p_coef + i_n * stride_coef)
    b_read = b_coef != 0.0  # rows with coef == 0 read nothing and write exact zeros
    b_scale = b_coef * inv_temperature  # coef * d a / d z
    p_st = p_stats + i_n * stride_stats_n
    b_max = tl.load(p_st + _MAX_S * stride_stats_k)
    b_log_sum = tl.load(p_st + _LOGSUM_S * stride_stats_k)
    b_rest = tl.load(p_st + _TAIL_S * stride_stats_k)  # R (bucket), 0 for renormalize

    # The categories, as the forward computed them (from its stored MAX_S, LOGSUM_S, TAIL_S), and their weights.
    b_lq, m_live, b_id, b_z = _load_slots(p_s_row, p_lq_row, p_id_row, stride_logprobs_k, stride_ids_k, num_slots,
                                          b_read, BLOCK_K)
    b_lp, b_lq, b_lp_tail, b_lq_tail = _categories(b_z, b_lq, m_live, b_max, b_log_sum, b_rest, inv_temperature, TAIL)
    b_w = _weights(b_lp, b_lq, beta, log_one_minus_beta, log_beta, DIVERGENCE)  # W_j = P_j g_j
    b_p = tl.exp(b_lp)  # P_j (0 off the live slots)
    b_w_slots = tl.sum(b_w, axis=0)  # sum_S W_j
    if TAIL == _BUCKET:
        # f W_tail and g_tail = f W_tail / P_tail (f = 0 through an active floor)
        b_free = b_rest > _TAIL_FLOOR
        b_w_tail_all = _weights(b_lp_tail, b_lq_tail, beta, log_one_minus_beta, log_beta, DIVERGENCE)
        b_w_tail = tl.where(b_free, b_w_tail_all, 0.0)
        b_g_tail = tl.where(b_free, b_w_tail_all / tl.exp(b_lp_tail), 0.0)
        b_neg_g = -((b_w_slots + b_w_tail) - b_g_tail)  # -G
    else:
        b_w_tail = tl.zeros((), tl.float32)
    # the slot's full value W_j - P_j (sum_S W_i + f W_tail)
    b_slot = (b_w - b_p * (b_w_slots + b_w_tail)) * b_scale

    b_zero = tl.zeros((BLOCK_V,), tl.float32)
    if TAIL == _BUCKET:
        # Padding columns [vocab_size, width) first (as triton_rows: disjoint columns), then -p_v G over [0, V)
        # (the slots' columns included: the scatter below overwrites them).
        for v0 in tl.range(vocab_size, width_student, BLOCK_V):
            o_col = v0 + o_v
            tl.store(p_gs_row + o_col, b_zero.to(p_grad_student.dtype.element_ty), mask=o_col < width_student)
        b_load_end = tl.where(b_read, vocab_size, 0)  # columns < b_load_end are read (none when coef == 0)
        for v0 in tl.range(0, vocab_size, BLOCK_V):
            o_col = v0 + o_v
            b_z_v = tl.load(p_s_row + o_col, mask=o_col < b_load_end, other=neg_inf).to(tl.float32)
            b_p_v = tl.exp((b_z_v - b_max) * inv_temperature - b_log_sum)
            b_g = tl.where(b_read, (b_p_v * b_neg_g) * b_scale, 0.0)
            tl.store(p_gs_row + o_col, _to_output(b_g, p_grad_student.dtype.element_ty, SOFT_BF16),
                     mask=o_col < vocab_size)
    else:
        # No gradient off the slots: zeros over the whole row, nothing read.
        for v0 in tl.range(0, width_student, BLOCK_V):
            o_col = v0 + o_v
            tl.store(p_gs_row + o_col, b_zero.to(p_grad_student.dtype.element_ty), mask=o_col < width_student)

    # The dense stores of every thread of the program before the slots' (a slot's column was just written).
    tl.debug_barrier()
    tl.store(p_gs_row + b_id, _to_output(b_slot, p_grad_student.dtype.element_ty, SOFT_BF16), mask=m_live)


# ---------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------
def _block_k(num_slots: int) -> int:
    """BLOCK_K: the slots' lanes, a power of two >= k (and >= MIN_BLOCK_K)."""
    return max(triton.next_power_of_2(int(num_slots)), MIN_BLOCK_K)


def _slot_strides(x: torch.Tensor) -> tuple:
    """(batch, position, slot) strides of a (B, T, k) slot tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def _sorted_live_ids(logprobs: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, k) int32, contiguous: each row's live ids in increasing order, then the sentinel vocab_size once per
    padding slot (whose id, garbage, is replaced before the sort: never compared, never an address)."""
    live = logprobs > float("-inf")  # the kernels' liveness (a NaN log-probability is padding)
    marked = torch.where(live, ids, vocab_size).to(torch.int32)
    return marked.reshape(ids.shape[0] * ids.shape[1], ids.shape[2]).sort(dim=-1).values.contiguous()


def topk_forward(student: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 call: TopKCall) -> torch.Tensor:
    """Row statistics (NUM_STATS, N) float32 per the contract's top-k rows: MAX_S, LOGSUM_S, KL, ENTROPY_S,
    TAIL_S, the others 0; exact zeros on rows whose mask is False (nothing of them is read)."""
    batch, length = student.shape[:2]
    n = batch * length
    stats = torch.empty((NUM_STATS, n), dtype=torch.float32, device=student.device)
    if n == 0:
        return stats
    mask_u8 = mask.view(torch.uint8)  # bool loads as bytes, the same on every Triton version
    bucket = call.tail == BUCKET
    # bucket: the live ids sorted (membership of a column in the slots while streaming); renormalize never
    # reads it (the ids stand in for the pointer)
    sorted_ids = _sorted_live_ids(logprobs, ids, call.vocab_size) if bucket else ids
    vocab_size, inv_temperature, beta, log_one_minus_beta, log_beta = _scalars(call)
    args = (
        student, logprobs, ids, sorted_ids, mask_u8, stats,
        *_row_strides(student), *_slot_strides(logprobs), *_slot_strides(ids), sorted_ids.stride(0) if bucket else 0,
        length, mask_u8.stride(0), stats.stride(0), stats.stride(1),
        vocab_size, ids.shape[-1], inv_temperature, beta, log_one_minus_beta, log_beta,
    )
    # Launched through wrap_triton (a compiler tracing the op sees the kernel); `kernel` is assigned from the
    # kernel's global name so that torch.library.triton_op finds it in this source. Both tails stream the row
    # (and so autotune, on a GPU when asked).
    kernel = _kernel(_topk_forward_kernel)
    with _on_device(student):
        wrap_triton(kernel)[(n,)](*args, DIVERGENCE=call.divergence, TAIL=call.tail, BLOCK_K=_block_k(ids.shape[-1]),
                                  **_launch_options(kernel, call.vocab_size))
    return stats


def topk_backward(student: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor, stats: torch.Tensor,
                  coef: torch.Tensor, call: TopKCall, grad_student: torch.Tensor) -> None:
    """Write coef * dd/dz into grad_student (B, T, Vs) per the contract's top-k rows: every row in full
    (zeros past vocab_size, exact zeros on rows with coef == 0, which read nothing), in place, whatever its
    (non-overlapping) strides on the first two dims."""
    batch, length = student.shape[:2]
    n = batch * length
    if n == 0:
        return
    vocab_size, inv_temperature, beta, log_one_minus_beta, log_beta = _scalars(call)
    args = (
        student, logprobs, ids, stats, coef, grad_student,
        *_row_strides(student), *_slot_strides(logprobs), *_slot_strides(ids), *_row_strides(grad_student), length,
        stats.stride(0), stats.stride(1), coef.stride(0), student.shape[-1],
        vocab_size, ids.shape[-1], inv_temperature, beta, log_one_minus_beta, log_beta,
    )
    bucket = call.tail == BUCKET
    kernel = _kernel(_topk_backward_kernel) if bucket else _topk_backward_kernel  # launched as in topk_forward
    if bucket:
        options = _launch_options(kernel, call.vocab_size)
    else:  # a zero fill of the row and the slots
        block_v, warps = _launch_config(call.vocab_size)
        options = {"BLOCK_V": block_v, "num_warps": warps}
    with _on_device(student):
        wrap_triton(kernel)[(n,)](*args, DIVERGENCE=call.divergence, TAIL=call.tail, SOFT_BF16=INTERPRETED,
                                  BLOCK_K=_block_k(ids.shape[-1]), **options)


OPS = define_topk_ops("triton", topk_forward, topk_backward, triton=True)
