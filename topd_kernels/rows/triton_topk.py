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
Launch configuration, autotuning (bucket only: the renormalize kernels never stream a row they read) and
the output rounding are triton_rows' (`_launch_config`, `_kernel`, `_launch_options`, `_to_output`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..config import BUCKET, RENORMALIZE
from .contract import NUM_STATS, TopKCall, define_topk_ops
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
# BLOCK_K is at least this (small blocks gain nothing and would only add compiled variants).
MIN_BLOCK_K = 16


# ---------------------------------------------------------------------------------------------------
# The math (derivation: contract.py, "Top-k teacher rows"; a = z_s / tau, V = vocab_size)
# ---------------------------------------------------------------------------------------------------
# Categories of a row: the live slots S (log P_j, log Q_j) plus, for "bucket", the tail.
#     bucket       MAX_S = max_v z_v, LOGSUM_S = log sum_v exp((z_v - MAX_S) / tau) over the V columns, by the
#                  online max / sum-exp of triton_rows (maxima on the raw logits, only shifted differences
#                  scaled by 1/tau); log P_j = (z_{id_j} - MAX_S) / tau - LOGSUM_S, log Q_j = logprob_j,
#                  P_tail = max(1 - sum_S P_j, 1e-7), Q_tail = max(1 - sum_S Q_j, 1e-7) (as logs).
#     renormalize  the row is not read: MAX_S, LOGSUM_S over the live slots' logits only (0, 0 with S empty),
#                  log P_j as above (= log softmax over S), log Q_j = logprob_j - logsumexp_S(logprob).
# d over the categories, with P = exp(log P), Q = exp(log Q) and every P (...) with P == 0 equal to 0:
#     reverse_kl  sum P (log P - log Q)
#     forward_kl  sum Q (log Q - log P)             (+inf when Q_j > 0 = P_j: a live slot at z = -inf)
#     jsd         beta K_q + (1 - beta) K_p, K_p = sum P (log P - log M), K_q = sum Q (log Q - log M),
#                 log M = logaddexp(log(1 - beta) + log P, log(beta) + log Q)
# Stored: MAX_S, LOGSUM_S, KL = d; the other statistics 0; masked rows read nothing and store zeros.
#
# Backward: the categories again, from the k slots and the stored MAX_S, LOGSUM_S (the forward's very
# float32 numbers and expressions, so the tail is the same number). Weights W_c = P_c g_c (g_c = dd/dP_c):
#     reverse_kl  P (log P - log Q + 1),   forward_kl  -Q,   jsd  (1 - beta) P (log P - log M)
#     g_tail = W_tail / P_tail where the tail is not floored (1 - sum_S P_j > 1e-7), else 0; 0 for renormalize
#     G = sum_S W_j - g_tail sum_S P_j
#     bucket       dd/da_v = -p_v G over the V columns (p_v = exp((z_v - MAX_S) / tau - LOGSUM_S)),
#                  plus W_j - P_j g_tail at the slot id_j   (at a slot: -P_j G + W_j - P_j g_tail)
#     renormalize  dd/da_v = 0 except at the slots: W_j - P_j G
# written as coef / tau * dd/da (dd/dz = dd/da / tau), zeros past V, exact zeros on rows with coef == 0
# (which read nothing). The dense pass stores every column first; after a barrier (the dense stores of all
# threads of the program ordered before it) a masked scatter stores the slots' full values at their ids.
#
# Precision: contract.py's note (the tail mass 1 - sum_S P_j errs by a few u (k + LOGSUM_S) absolute). That
# error is amplified by |dd/dP_tail|: moderate for reverse_kl and jsd, but Q_tail / P_tail for forward_kl, whose
# g_tail = -Q_tail / P_tail also makes -P_j G and -P_j g_tail cancel at the slots; when the student holds all
# but float32 noise on the slots, that noise decides whether the floor is active (tests/test_triton_topk.py,
# test_forward_kl_tail_noise). The torch path shares all of it (same arithmetic).
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
def _categories(b_z, b_lq, m_live, b_max, b_log_sum, inv_temperature, TAIL: tl.constexpr):
    """(log P (BLOCK_K), log Q (BLOCK_K), log P_tail, log Q_tail, 1 - sum_S P_j) of one row, -inf off the live
    slots. renormalize: log Q renormalised over S; the tail values are placeholders (-inf, -inf, 0)."""
    neg_inf = float("-inf")
    b_lp = tl.where(m_live, (b_z - b_max) * inv_temperature - b_log_sum, neg_inf)
    if TAIL == _BUCKET:
        b_p_rest = 1.0 - tl.sum(tl.exp(b_lp), axis=0)
        b_lp_tail = tl.log(tl.maximum(b_p_rest, _TAIL_FLOOR))
        b_lq_tail = tl.log(tl.maximum(1.0 - tl.sum(tl.exp(b_lq), axis=0), _TAIL_FLOOR))
    else:
        # log Q_j = log q_j - logsumexp_S(log q) (torch.logsumexp; 0 for an empty S)
        b_q_max = tl.max(b_lq, axis=0)
        b_q_shift = tl.where(b_q_max == neg_inf, 0.0, b_q_max)
        b_lse_q = tl.log(tl.sum(tl.exp(b_lq - b_q_shift), axis=0)) + b_q_shift
        b_lq = b_lq - tl.where(b_lse_q == neg_inf, 0.0, b_lse_q)
        b_lp_tail = tl.full((), neg_inf, tl.float32)
        b_lq_tail = tl.full((), neg_inf, tl.float32)
        b_p_rest = tl.zeros((), tl.float32)
    return b_lp, b_lq, b_lp_tail, b_lq_tail, b_p_rest


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
    length,  # int: T, positions per batch entry (row i is (i // T, i % T))
    stride_mask,  # int: elements between consecutive mask entries
    stride_stats_k,  # int: elements between the NUM_STATS stats rows
    stride_stats_n,  # int: elements between consecutive entries of a stats row
    vocab_size,  # int: V, the student's columns read (bucket); every live id is in [0, V)
    num_slots,  # int: k, slots per row (<= BLOCK_K)
    inv_temperature,  # fp32: 1 / tau (the student's only)
    beta,  # fp32: jsd mixture weight of the teacher (unused otherwise)
    log_one_minus_beta,  # fp32: log(1 - beta) (jsd only)
    log_beta,  # fp32: log(beta) (jsd only)
    DIVERGENCE: tl.constexpr,  # config.DIVERGENCE_CODES: 0 reverse_kl, 1 forward_kl, 2 jsd (selects code)
    TAIL: tl.constexpr,  # config.TAIL_CODES: 0 bucket (reads the row), 1 renormalize (the slots only)
    BLOCK_V: tl.constexpr,  # columns per block of the row pass (power of two; unused by renormalize)
    BLOCK_K: tl.constexpr,  # slot lanes (power of two >= k)
):
    i_n = tl.program_id(0).to(tl.int64)  # row index; int64 so that the row offsets cannot overflow
    i_b = i_n // length  # batch entry of the row
    i_t = i_n % length  # position of the row
    p_s_row = _row_start(p_student, i_b, i_t, stride_student_b, stride_student_t)
    p_lq_row = _row_start(p_logprobs, i_b, i_t, stride_logprobs_b, stride_logprobs_t)
    p_id_row = _row_start(p_ids, i_b, i_t, stride_ids_b, stride_ids_t)
    b_valid = tl.load(p_mask + i_n * stride_mask) != 0  # masked rows read nothing
    neg_inf = float("-inf")

    if TAIL == _BUCKET:
        # Online max / sum-exp over the V columns (triton_rows' forward, the student alone).
        o_v = tl.arange(0, BLOCK_V)
        b_end = tl.where(b_valid, vocab_size, 0)  # columns read: none on a masked row
        b_max = tl.full((), neg_inf, tl.float32)  # running max of the raw logits z
        b_sum = tl.zeros((), tl.float32)  # running sum exp((z - b_max) / tau)
        for v0 in tl.range(0, b_end, BLOCK_V):
            o_col = v0 + o_v
            b_z_v = tl.load(p_s_row + o_col, mask=o_col < vocab_size, other=neg_inf).to(tl.float32)
            b_new_max = tl.maximum(b_max, tl.max(b_z_v, axis=0))
            # alpha = exp(M - M'); 1 while the max is still -inf (the sum is 0 then)
            b_alpha = tl.where(b_new_max == neg_inf, 1.0, tl.exp((b_max - b_new_max) * inv_temperature))
            b_e = tl.where(b_z_v == neg_inf, 0.0, tl.exp((b_z_v - b_new_max) * inv_temperature))
            b_sum = b_alpha * b_sum + tl.sum(b_e, axis=0)
            b_max = b_new_max
        b_log_sum = tl.log(b_sum)
        b_lq, m_live, b_id, b_z = _load_slots(p_s_row, p_lq_row, p_id_row, stride_logprobs_k, stride_ids_k,
                                              num_slots, b_valid, BLOCK_K)
    else:
        # The normalisers of the live slots' logits (0, 0 when S is empty); the row itself is not read.
        b_lq, m_live, b_id, b_z = _load_slots(p_s_row, p_lq_row, p_id_row, stride_logprobs_k, stride_ids_k,
                                              num_slots, b_valid, BLOCK_K)
        b_any = tl.max(m_live.to(tl.int32), axis=0) > 0
        b_max = tl.where(b_any, tl.max(tl.where(m_live, b_z, neg_inf), axis=0), 0.0)
        b_e = tl.where(m_live & (b_z > neg_inf), tl.exp((b_z - b_max) * inv_temperature), 0.0)
        b_log_sum = tl.where(b_any, tl.log(tl.sum(b_e, axis=0)), 0.0)

    b_lp, b_lq, b_lp_tail, b_lq_tail, b_p_rest = _categories(b_z, b_lq, m_live, b_max, b_log_sum, inv_temperature,
                                                             TAIL)
    b_d = _divergence(b_lp, b_lq, b_lp_tail, b_lq_tail, beta, log_one_minus_beta, log_beta, DIVERGENCE, TAIL)

    # Every statistic of the row, exact zeros on masked rows (their loop ran no step: -inf max, -inf logsum).
    p_out = p_stats + i_n * stride_stats_n
    tl.store(p_out + _MAX_S * stride_stats_k, tl.where(b_valid, b_max, 0.0))
    tl.store(p_out + _LOGSUM_S * stride_stats_k, tl.where(b_valid, b_log_sum, 0.0))
    tl.store(p_out + _KL * stride_stats_k, tl.where(b_valid, b_d, 0.0))
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

    # The categories, as the forward computed them (from its stored MAX_S, LOGSUM_S), and their weights.
    b_lq, m_live, b_id, b_z = _load_slots(p_s_row, p_lq_row, p_id_row, stride_logprobs_k, stride_ids_k, num_slots,
                                          b_read, BLOCK_K)
    b_lp, b_lq, b_lp_tail, b_lq_tail, b_p_rest = _categories(b_z, b_lq, m_live, b_max, b_log_sum, inv_temperature,
                                                             TAIL)
    b_w = _weights(b_lp, b_lq, beta, log_one_minus_beta, log_beta, DIVERGENCE)  # W_j = P_j g_j
    b_p = tl.exp(b_lp)  # P_j (0 off the live slots)
    if TAIL == _BUCKET:
        # g_tail = W_tail / P_tail, 0 through an active floor
        b_w_tail = _weights(b_lp_tail, b_lq_tail, beta, log_one_minus_beta, log_beta, DIVERGENCE)
        b_g_tail = tl.where(b_p_rest > _TAIL_FLOOR, b_w_tail / tl.exp(b_lp_tail), 0.0)
        b_g_total = tl.sum(b_w, axis=0) - b_g_tail * tl.sum(b_p, axis=0)  # G
        # the slot's full value: the dense -P_j G plus its own W_j - P_j g_tail
        b_slot = b_p * -b_g_total + (b_w - b_p * b_g_tail)
    else:
        b_g_total = tl.sum(b_w, axis=0)  # G (g_tail = 0)
        b_slot = b_w - b_p * b_g_total
    b_slot = b_slot * b_scale

    b_zero = tl.zeros((BLOCK_V,), tl.float32)
    if TAIL == _BUCKET:
        # Padding columns [vocab_size, width) first (as triton_rows: disjoint columns), then -p_v G over [0, V).
        for v0 in tl.range(vocab_size, width_student, BLOCK_V):
            o_col = v0 + o_v
            tl.store(p_gs_row + o_col, b_zero.to(p_grad_student.dtype.element_ty), mask=o_col < width_student)
        b_load_end = tl.where(b_read, vocab_size, 0)  # columns < b_load_end are read (none when coef == 0)
        b_neg_g = -b_g_total
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


def _slot_warps(block_k: int) -> int:
    """num_warps of a launch that touches only the slots (the renormalize forward)."""
    return min(8, max(1, block_k // 256))


def _slot_strides(x: torch.Tensor) -> tuple:
    """(batch, position, slot) strides of a (B, T, k) slot tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def topk_forward(student: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 call: TopKCall) -> torch.Tensor:
    """Row statistics (NUM_STATS, N) float32 per the contract's top-k rows: MAX_S, LOGSUM_S, KL, the others 0;
    exact zeros on rows whose mask is False (nothing of them is read)."""
    batch, length = student.shape[:2]
    n = batch * length
    stats = torch.empty((NUM_STATS, n), dtype=torch.float32, device=student.device)
    if n == 0:
        return stats
    mask_u8 = mask.view(torch.uint8)  # bool loads as bytes, the same on every Triton version
    block_k = _block_k(ids.shape[-1])
    vocab_size, inv_temperature, beta, log_one_minus_beta, log_beta = _scalars(call)
    args = (
        student, logprobs, ids, mask_u8, stats,
        *_row_strides(student), *_slot_strides(logprobs), *_slot_strides(ids), length,
        mask_u8.stride(0), stats.stride(0), stats.stride(1),
        vocab_size, ids.shape[-1], inv_temperature, beta, log_one_minus_beta, log_beta,
    )
    # Launched through wrap_triton (a compiler tracing the op sees the kernel); `kernel` is assigned from the
    # kernel's global name so that torch.library.triton_op finds it in this source. Only bucket streams rows
    # (and so autotunes, on a GPU when asked); renormalize touches k slots per row.
    bucket = call.tail == BUCKET
    kernel = _kernel(_topk_forward_kernel) if bucket else _topk_forward_kernel
    options = (_launch_options(kernel, call.vocab_size) if bucket
               else {"BLOCK_V": MIN_BLOCK_K, "num_warps": _slot_warps(block_k)})
    with _on_device(student):
        wrap_triton(kernel)[(n,)](*args, DIVERGENCE=call.divergence, TAIL=call.tail, BLOCK_K=block_k, **options)
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
