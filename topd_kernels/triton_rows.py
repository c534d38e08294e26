"""Triton row backend: `row_forward` / `row_backward` per the contract in `backends.py`.

One Triton program handles one row (one token position) and streams over its vocabulary in blocks of
BLOCK_V columns. Nothing of size N x V is ever allocated besides the gradients the caller hands in.

Inputs may be float32 / bfloat16 / float16 (student and teacher independently), with any row stride
(the last dimension must have stride 1) and different last-dim sizes; only the first `vocab_size`
columns are read. Every load is converted to float32 at once (bf16 arithmetic is wrong under the Triton
interpreter, and fp32 is what we want on the GPU anyway). Row offsets are computed in int64
(`row * stride` passes 2^31 for N = 16384, V = 151936).

Block size / warps: a fixed default chosen from the vocabulary size (`_launch_config`); the environment
variable TOPD_TRITON_BLOCK_V (a power of two) overrides the block size (tests use it to force many
blocks per row); TOPD_TRITON_AUTOTUNE=1 autotunes over a small config set on a GPU (never under the
interpreter, where one big block per row keeps the tests fast).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["row_forward", "row_backward", "DIVERGENCE_IDS"]

# The divergence selects code inside the kernels, so it is a constexpr int.
DIVERGENCE_IDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
_REVERSE_KL: tl.constexpr = tl.constexpr(0)
_FORWARD_KL: tl.constexpr = tl.constexpr(1)
_JSD: tl.constexpr = tl.constexpr(2)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
# Notation for one row: a_s = z_s / tau, a_t = z_t / tau over v < V; lse_x = log sum_v exp(a_x);
# log p_x = a_x - lse_x.
#
# Online log-sum-exp (per model x in {s, t}). After the blocks seen so far we hold the running max
# M_x and the running sum L_x = sum_v exp(a_x - M_x). A new block with maximum b raises the max to
# M'_x = max(M_x, b); the old sum is rescaled by alpha_x = exp(M_x - M'_x) and the block adds
# sum exp(a_x - M'_x). At the end lse_x = M_x + log L_x. (While M_x is still -inf -- every entry so
# far -inf -- L_x = 0 and alpha_x is taken as 1; entries at -inf add exp(-inf) = 0, written with
# tl.where so that -inf - -inf never reaches a sum.)
#
# Reverse KL, one pass. With e_v = exp(a_s - M_s) and shifted log-weights l_s = a_s - M_s,
# l_t = a_t - M_t, keep the cross term
#     X = sum_v e_v (l_s - l_t)        (relative to the *current* maxes M_s, M_t)
# Then, since log p_s - log p_t = (l_s - log L_s) - (l_t - log L_t) and sum_v p_s = 1,
#     d = sum_v p_s (log p_s - log p_t) = X / L_s - log L_s + log L_t.
# When the maxes move to M'_s, M'_t, each e_v is multiplied by alpha_s and each (l_s - l_t) is shifted
# by -((M'_s - M_s) - (M'_t - M_t)), so
#     X' = alpha_s * (X + L_s * ((M_s - M_t) - (M'_s - M'_t))) + sum_block e'_v (l'_s - l'_t).
# Working with shifted log-weights (not raw a_s - a_t) keeps the cancellation in X / L_s - log L_s +
# log L_t at the size of the log-probabilities instead of the size of the logits.
# Terms with p_s = 0 (a_s = -inf) contribute 0 (tl.where, never 0 * inf). A position with p_s > 0 and
# p_t = 0 makes the divergence +inf: it is flagged (b_inf_hit) and left out of X, and d = +inf.
#
# Forward KL, one pass: the mirror image, X = sum_v exp(a_t - M_t) (l_t - l_s), rescaled by alpha_t,
#     d = X / L_t - log L_t + log L_s,  +inf when p_t > 0 where p_s = 0.
#
# JSD, two passes. mix = (1 - beta) p_s + beta p_t needs the *normalised* probabilities, and
# log mix = log((1-beta) exp(a_s - lse_s) + beta exp(a_t - lse_t)) does not factor into a running
# quantity that can be rescaled when lse_s and lse_t move independently (the ratio of the two
# normalisers changes the shape of the mixture inside the log). So pass 1 computes lse_s and lse_t
# with the online log-sum-exp, and pass 2 re-reads the row (mostly from L2 on a GPU) and accumulates
#     K_s = sum_v p_s (log p_s - log mix),  K_t = sum_v p_t (log p_t - log mix),
#     d = beta K_t + (1 - beta) K_s,  aux = K_s,
# with log mix = logaddexp(log(1-beta) + log p_s, log(beta) + log p_t), evaluated as
# hi + log(1 + exp(lo - hi)) and -inf when both are -inf; p * (...) with p = 0 is 0.
#
# Precision. The maxima are tracked on the raw logits z (dividing by tau > 0 keeps the order) and only
# shifted differences are scaled: l = (z - max z) * (1/tau). The rounding of the scaling (and of 1/tau
# itself) is then relative to the size of the log-probabilities, not to the size of the logits, which
# keeps d as accurate as a plain float32 log_softmax computation. lse = max z * (1/tau) + log L is
# scaled exactly as the backward scales z (z * (1/tau) - lse), so that the rounding of 1/tau cancels
# between the two to first order.
@triton.jit
def _row_forward_kernel(
    p_student,  # *fp32/bf16/fp16: student logits; row i starts at p_student + i * stride_student
    p_teacher,  # *fp32/bf16/fp16: teacher logits; row i starts at p_teacher + i * stride_teacher
    p_stats,  # *fp32 (4, N) output: lse_s, lse_t, d, aux; element (k, i) at k * stride_stats_k + i * stride_stats_n
    stride_student,  # int: elements between consecutive student rows (last dim has stride 1)
    stride_teacher,  # int: elements between consecutive teacher rows (last dim has stride 1)
    stride_stats_k,  # int: elements between the 4 stats rows
    stride_stats_n,  # int: elements between consecutive entries of a stats row
    vocab_size,  # int: V, the number of columns read from each row (<= both last dims)
    inv_temperature,  # fp32: 1 / tau
    beta,  # fp32: jsd mixture weight of the teacher (unused otherwise)
    log_one_minus_beta,  # fp32: log(1 - beta) (jsd only)
    log_beta,  # fp32: log(beta) (jsd only)
    DIVERGENCE: tl.constexpr,  # 0 reverse_kl, 1 forward_kl, 2 jsd (selects code)
    BLOCK_V: tl.constexpr,  # columns per block (power of two)
):
    i_n = tl.program_id(0).to(tl.int64)  # row index; int64 so that i_n * stride cannot overflow
    p_s_row = p_student + i_n * stride_student
    p_t_row = p_teacher + i_n * stride_teacher
    o_v = tl.arange(0, BLOCK_V)

    neg_inf = float("-inf")
    # Maxima of the raw logits; only shifted differences are scaled by 1/tau (see "Precision" above).
    b_max_s = tl.full((), neg_inf, tl.float32)  # running max of z_s (M_s = b_max_s / tau)
    b_max_t = tl.full((), neg_inf, tl.float32)  # running max of z_t (M_t = b_max_t / tau)
    b_sum_s = tl.zeros((), tl.float32)  # running L_s = sum exp(a_s - M_s)
    b_sum_t = tl.zeros((), tl.float32)  # running L_t = sum exp(a_t - M_t)
    b_cross = tl.zeros((), tl.float32)  # running cross term X (reverse / forward KL)
    b_inf_hit = tl.zeros((), tl.float32)  # 1 when some p_x > 0 meets p_other = 0 (d = +inf)

    for v0 in tl.range(0, vocab_size, BLOCK_V):
        o_col = v0 + o_v
        m_col = o_col < vocab_size
        b_z_s = tl.load(p_s_row + o_col, mask=m_col, other=neg_inf).to(tl.float32)
        b_z_t = tl.load(p_t_row + o_col, mask=m_col, other=neg_inf).to(tl.float32)

        b_new_max_s = tl.maximum(b_max_s, tl.max(b_z_s, axis=0))
        b_new_max_t = tl.maximum(b_max_t, tl.max(b_z_t, axis=0))
        # alpha = exp(M - M'); 1 while the max is still -inf (the sums are 0 then)
        b_alpha_s = tl.where(b_new_max_s == neg_inf, 1.0, tl.exp((b_max_s - b_new_max_s) * inv_temperature))
        b_alpha_t = tl.where(b_new_max_t == neg_inf, 1.0, tl.exp((b_max_t - b_new_max_t) * inv_temperature))
        b_l_s = (b_z_s - b_new_max_s) * inv_temperature  # shifted log-weights a - M' (-inf where z = -inf)
        b_l_t = (b_z_t - b_new_max_t) * inv_temperature
        b_e_s = tl.where(b_z_s == neg_inf, 0.0, tl.exp(b_l_s))
        b_e_t = tl.where(b_z_t == neg_inf, 0.0, tl.exp(b_l_t))
        m_both = (b_z_s > neg_inf) & (b_z_t > neg_inf)  # entries where both probabilities are > 0

        if DIVERGENCE == _REVERSE_KL:
            # sum e_s (l_s - l_t) over entries with p_s > 0 and p_t > 0; p_s > 0, p_t = 0 -> +inf
            m_hit = (b_z_s > neg_inf) & (b_z_t == neg_inf) & m_col
            b_inf_hit = tl.maximum(b_inf_hit, tl.max(tl.where(m_hit, 1.0, 0.0), axis=0))
            b_term = tl.where(m_both, b_e_s * (b_l_s - b_l_t), 0.0)
            b_shift = ((b_max_s - b_new_max_s) - (b_max_t - b_new_max_t)) * inv_temperature
            b_corr = tl.where((b_sum_s > 0) & (b_max_t > neg_inf), b_sum_s * b_shift, 0.0)
            b_cross = b_alpha_s * (b_cross + b_corr) + tl.sum(b_term, axis=0)
        elif DIVERGENCE == _FORWARD_KL:
            # mirror image: sum e_t (l_t - l_s); p_t > 0, p_s = 0 -> +inf
            m_hit = (b_z_t > neg_inf) & (b_z_s == neg_inf) & m_col
            b_inf_hit = tl.maximum(b_inf_hit, tl.max(tl.where(m_hit, 1.0, 0.0), axis=0))
            b_term = tl.where(m_both, b_e_t * (b_l_t - b_l_s), 0.0)
            b_shift = ((b_max_t - b_new_max_t) - (b_max_s - b_new_max_s)) * inv_temperature
            b_corr = tl.where((b_sum_t > 0) & (b_max_s > neg_inf), b_sum_t * b_shift, 0.0)
            b_cross = b_alpha_t * (b_cross + b_corr) + tl.sum(b_term, axis=0)

        b_sum_s = b_alpha_s * b_sum_s + tl.sum(b_e_s, axis=0)
        b_sum_t = b_alpha_t * b_sum_t + tl.sum(b_e_t, axis=0)
        b_max_s = b_new_max_s
        b_max_t = b_new_max_t

    b_log_sum_s = tl.log(b_sum_s)
    b_log_sum_t = tl.log(b_sum_t)
    # lse = max z * (1/tau) + log L: scaled as the backward scales z (see "Precision" above).
    b_lse_s = b_max_s * inv_temperature + b_log_sum_s
    b_lse_t = b_max_t * inv_temperature + b_log_sum_t
    b_aux = tl.zeros((), tl.float32)

    if DIVERGENCE == _REVERSE_KL:
        b_d = b_cross / b_sum_s - b_log_sum_s + b_log_sum_t
        b_d = tl.where(b_inf_hit > 0, float("inf"), b_d)
    elif DIVERGENCE == _FORWARD_KL:
        b_d = b_cross / b_sum_t - b_log_sum_t + b_log_sum_s
        b_d = tl.where(b_inf_hit > 0, float("inf"), b_d)
    else:
        # JSD pass 2: needs the final normalisers (see the derivation above).
        # log p = (z - max z) / tau - log L, again relative to the row maximum.
        b_k_s = tl.zeros((), tl.float32)  # K_s = KL(p_s || mix)
        b_k_t = tl.zeros((), tl.float32)  # K_t = KL(p_t || mix)
        for v0 in tl.range(0, vocab_size, BLOCK_V):
            o_col = v0 + o_v
            m_col = o_col < vocab_size
            b_z_s = tl.load(p_s_row + o_col, mask=m_col, other=neg_inf).to(tl.float32)
            b_z_t = tl.load(p_t_row + o_col, mask=m_col, other=neg_inf).to(tl.float32)
            b_lp_s = (b_z_s - b_max_s) * inv_temperature - b_log_sum_s
            b_lp_t = (b_z_t - b_max_t) * inv_temperature - b_log_sum_t
            b_p_s = tl.where(b_z_s == neg_inf, 0.0, tl.exp(b_lp_s))
            b_p_t = tl.where(b_z_t == neg_inf, 0.0, tl.exp(b_lp_t))
            b_x_s = b_lp_s + log_one_minus_beta
            b_x_t = b_lp_t + log_beta
            b_hi = tl.maximum(b_x_s, b_x_t)
            b_lo = tl.minimum(b_x_s, b_x_t)
            b_log_mix = tl.where(b_hi == neg_inf, neg_inf, b_hi + tl.log(1.0 + tl.exp(b_lo - b_hi)))
            b_k_s += tl.sum(tl.where(b_p_s > 0, b_p_s * (b_lp_s - b_log_mix), 0.0), axis=0)
            b_k_t += tl.sum(tl.where(b_p_t > 0, b_p_t * (b_lp_t - b_log_mix), 0.0), axis=0)
        b_d = beta * b_k_t + (1.0 - beta) * b_k_s
        b_aux = b_k_s

    p_out = p_stats + i_n * stride_stats_n
    tl.store(p_out, b_lse_s)
    tl.store(p_out + stride_stats_k, b_lse_t)
    tl.store(p_out + 2 * stride_stats_k, b_d)
    tl.store(p_out + 3 * stride_stats_k, b_aux)


@triton.jit
def _to_output(b_x, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Cast float32 b_x to the output dtype. SOFT_BF16 (the interpreter only, whose fp32 -> bf16 cast
    truncates): round to nearest even by hand on the bits, as the GPU's cvt.rn.bf16.f32 does."""
    if SOFT_BF16 and DTYPE == tl.bfloat16:
        b_bits = b_x.to(tl.uint32, bitcast=True)
        b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) >> 16
        b_bits = tl.where(b_x != b_x, 0x7FC0, b_bits)  # keep NaN a NaN
        return b_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return b_x.to(DTYPE)


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------
# Per row we write g_s = coef * dd/dz_s (and g_t = coef * dd/dz_t), with a = z / tau so that
# dd/dz = (1 / tau) dd/da, and log p = a - lse recomputed from the saved lse (no second reduction).
# For a softmax p = softmax(a), d p_u / d a_v = p_u (1[u = v] - p_v), so for any function
# F(p) with partials f_u = dF/dp_u:   dF/da_v = p_v (f_v - sum_u p_u f_u).
#
# reverse_kl  d = sum p_s (log p_s - log p_t)
#   student: f_v = log p_s,v - log p_t,v + 1, sum_u p_s f_u = d + 1
#            -> dd/da_s = p_s (log p_s - log p_t - d)
#   teacher: d = sum p_s log p_s - sum p_s log p_t; dd/dlog p_t = -p_s; with log-softmax
#            d log p_t,u / d a_t,v = 1[u = v] - p_t,v  -> dd/da_t = -p_s + p_t (sum p_s) = p_t - p_s
# forward_kl  d = sum p_t (log p_t - log p_s): the mirror image
#            -> dd/da_s = p_s - p_t,   dd/da_t = p_t (log p_t - log p_s - d)
# jsd  mix = (1-beta) p_s + beta p_t,  d = beta KL(p_t||mix) + (1-beta) KL(p_s||mix)
#      = beta sum p_t log p_t + (1-beta) sum p_s log p_s - sum mix log mix
#   student: f_v = (1-beta)(log p_s,v + 1) - (1-beta)(log mix_v + 1) = (1-beta)(log p_s,v - log mix_v),
#            sum_u p_s f_u = (1-beta) K_s  -> dd/da_s = (1-beta) p_s (log p_s - log mix - K_s)
#   teacher: likewise dd/da_t = beta p_t (log p_t - log mix - K_t), with K_s = aux and
#            K_t = (d - (1-beta) K_s) / beta.
# Every p * (...) with p = 0 is written as 0 with tl.where (an entry at -inf contributes nothing).
# Rows with coef == 0 skip the loads and store exact zeros (tl.where, never NaN * 0); columns
# >= vocab_size of each gradient are stored as zeros.
@triton.jit
def _row_backward_kernel(
    p_student,  # *fp32/bf16/fp16: student logits; row i at p_student + i * stride_student
    p_teacher,  # *fp32/bf16/fp16: teacher logits; row i at p_teacher + i * stride_teacher
    p_stats,  # *fp32 (4, N): lse_s, lse_t, d, aux from row_forward; (k, i) at k * stride_stats_k + i * stride_stats_n
    p_coef,  # *fp32 (N,): per-row multiplier; entry i at p_coef + i * stride_coef
    p_grad_student,  # *dtype of student, (N, width_grad_student) output; row i at + i * stride_grad_student
    p_grad_teacher,  # *dtype of teacher, (N, width_grad_teacher) output (unused unless HAS_GRAD_TEACHER)
    stride_student,  # int: elements between consecutive student rows
    stride_teacher,  # int: elements between consecutive teacher rows
    stride_stats_k,  # int: elements between the 4 stats rows
    stride_stats_n,  # int: elements between consecutive entries of a stats row
    stride_coef,  # int: elements between consecutive coef entries
    stride_grad_student,  # int: elements between consecutive grad_student rows
    stride_grad_teacher,  # int: elements between consecutive grad_teacher rows
    width_grad_student,  # int: last dim of grad_student (columns >= vocab_size are zero-filled)
    width_grad_teacher,  # int: last dim of grad_teacher
    vocab_size,  # int: V, columns that carry gradient
    inv_temperature,  # fp32: 1 / tau
    beta,  # fp32: jsd mixture weight of the teacher
    log_one_minus_beta,  # fp32: log(1 - beta) (jsd only)
    log_beta,  # fp32: log(beta) (jsd only)
    DIVERGENCE: tl.constexpr,  # 0 reverse_kl, 1 forward_kl, 2 jsd (selects code)
    HAS_GRAD_TEACHER: tl.constexpr,  # whether to write the teacher gradient (selects code)
    SOFT_BF16: tl.constexpr,  # round fp32 -> bf16 by hand (True only under the interpreter, which truncates)
    BLOCK_V: tl.constexpr,  # columns per block (power of two)
):
    i_n = tl.program_id(0).to(tl.int64)  # row index; int64 offsets
    p_s_row = p_student + i_n * stride_student
    p_t_row = p_teacher + i_n * stride_teacher
    p_gs_row = p_grad_student + i_n * stride_grad_student
    p_gt_row = p_grad_teacher + i_n * stride_grad_teacher
    o_v = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    b_coef = tl.load(p_coef + i_n * stride_coef)
    b_live = b_coef != 0.0  # rows with coef == 0 read nothing and write exact zeros
    b_load_end = tl.where(b_live, vocab_size, 0)  # columns < b_load_end are read (none when coef == 0)
    p_st = p_stats + i_n * stride_stats_n
    b_lse_s = tl.load(p_st)
    b_lse_t = tl.load(p_st + stride_stats_k)
    b_d = tl.load(p_st + 2 * stride_stats_k)
    b_aux = tl.load(p_st + 3 * stride_stats_k)
    b_scale = b_coef * inv_temperature  # coef * d a / d z
    b_k_t = (b_d - (1.0 - beta) * b_aux) / beta  # jsd: K_t = KL(p_t || mix) (beta = 0.5 otherwise, unused)

    for v0 in tl.range(0, vocab_size, BLOCK_V):
        o_col = v0 + o_v
        m_col = o_col < vocab_size
        m_load = o_col < b_load_end
        b_a_s = tl.load(p_s_row + o_col, mask=m_load, other=neg_inf).to(tl.float32) * inv_temperature
        b_a_t = tl.load(p_t_row + o_col, mask=m_load, other=neg_inf).to(tl.float32) * inv_temperature
        b_lp_s = b_a_s - b_lse_s
        b_lp_t = b_a_t - b_lse_t
        b_p_s = tl.exp(b_lp_s)
        b_p_t = tl.exp(b_lp_t)
        if DIVERGENCE == _REVERSE_KL:
            b_g_s = tl.where(b_p_s > 0, b_p_s * (b_lp_s - b_lp_t - b_d), 0.0)
            b_g_t = b_p_t - b_p_s
        elif DIVERGENCE == _FORWARD_KL:
            b_g_s = b_p_s - b_p_t
            b_g_t = tl.where(b_p_t > 0, b_p_t * (b_lp_t - b_lp_s - b_d), 0.0)
        else:
            b_x_s = b_lp_s + log_one_minus_beta
            b_x_t = b_lp_t + log_beta
            b_hi = tl.maximum(b_x_s, b_x_t)
            b_lo = tl.minimum(b_x_s, b_x_t)
            b_log_mix = tl.where(b_hi == neg_inf, neg_inf, b_hi + tl.log(1.0 + tl.exp(b_lo - b_hi)))
            b_g_s = tl.where(b_p_s > 0, (1.0 - beta) * b_p_s * (b_lp_s - b_log_mix - b_aux), 0.0)
            b_g_t = tl.where(b_p_t > 0, beta * b_p_t * (b_lp_t - b_log_mix - b_k_t), 0.0)
        b_g_s = tl.where(b_live, b_scale * b_g_s, 0.0)
        tl.store(p_gs_row + o_col, _to_output(b_g_s, p_grad_student.dtype.element_ty, SOFT_BF16), mask=m_col)
        if HAS_GRAD_TEACHER:
            b_g_t = tl.where(b_live, b_scale * b_g_t, 0.0)
            tl.store(p_gt_row + o_col, _to_output(b_g_t, p_grad_teacher.dtype.element_ty, SOFT_BF16), mask=m_col)

    # Padding columns [vocab_size, width) get no gradient.
    b_zero = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in tl.range(vocab_size, width_grad_student, BLOCK_V):
        o_col = v0 + o_v
        m_col = o_col < width_grad_student
        tl.store(p_gs_row + o_col, b_zero.to(p_grad_student.dtype.element_ty), mask=m_col)
    if HAS_GRAD_TEACHER:
        for v0 in tl.range(vocab_size, width_grad_teacher, BLOCK_V):
            o_col = v0 + o_v
            m_col = o_col < width_grad_teacher
            tl.store(p_gt_row + o_col, b_zero.to(p_grad_teacher.dtype.element_ty), mask=m_col)


# ---------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------
def _is_interpreted(kernel) -> bool:
    """Whether `kernel` was decorated under TRITON_INTERPRET=1 (decided when the module imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _block_override() -> int | None:
    raw = os.environ.get("TOPD_TRITON_BLOCK_V")
    if not raw:
        return None
    block = int(raw)
    if block < 16 or block & (block - 1):
        raise ValueError(f"TOPD_TRITON_BLOCK_V must be a power of two >= 16, got {raw!r}")
    return block


def _launch_config(vocab_size: int, interpreted: bool, backward: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps): a fixed default per vocabulary range.

    On a GPU: up to 4096 columns per block (forward: two fp32 rows of 4096 in registers; the backward
    holds more live values per column, so it stops at 4096 with 8 warps too). Under the interpreter the
    cost is per block step, so use one block per row up to 32768 columns.
    """
    override = _block_override()
    full = triton.next_power_of_2(max(int(vocab_size), 16))
    if interpreted:
        return (override or min(full, 32768)), 4
    block = override or min(full, 4096)
    if block >= 4096:
        warps = 8
    elif block >= 1024:
        warps = 4
    else:
        warps = 2
    return block, warps


def _autotune_requested(interpreted: bool) -> bool:
    return (not interpreted) and os.environ.get("TOPD_TRITON_AUTOTUNE", "0") == "1"


_AUTOTUNED: dict = {}


def _autotuned(kernel):
    """An autotuned wrapper of `kernel` (built lazily, only when TOPD_TRITON_AUTOTUNE=1 on a GPU)."""
    if kernel not in _AUTOTUNED:
        configs = [
            triton.Config({"BLOCK_V": block}, num_warps=warps)
            for block in (1024, 2048, 4096, 8192)
            for warps in (4, 8, 16)
            if not (block == 1024 and warps == 16)
        ]
        # Keys: vocab_size and the divergence; argument dtypes are part of the autotuner key already.
        key = ["vocab_size", "DIVERGENCE"] + (["HAS_GRAD_TEACHER"] if kernel is _row_backward_kernel else [])
        _AUTOTUNED[kernel] = triton.autotune(configs=configs, key=key)(kernel)
    return _AUTOTUNED[kernel]


# ---------------------------------------------------------------------------------------------------
# Python entry points (the row-backend contract)
# ---------------------------------------------------------------------------------------------------
def _check_logits(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (N, V) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be float32, bfloat16 or float16, got {x.dtype}")


def _check_device(x: torch.Tensor, interpreted: bool) -> None:
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and interpreted:
        return
    raise ValueError(
        f"triton_rows: tensors must be on CUDA (or on the CPU with TRITON_INTERPRET=1 set before "
        f"import); got {x.device}"
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its last dim has stride 1, else a contiguous copy (for reading only)."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _common_args(vocab_size, temperature, divergence, beta, vs: int, vt: int):
    if divergence not in DIVERGENCE_IDS:
        raise ValueError(f"divergence: unknown divergence {divergence!r}; expected one of {tuple(DIVERGENCE_IDS)}")
    vocab_size = int(vocab_size)
    if not 1 <= vocab_size <= min(vs, vt):
        raise ValueError(f"vocab_size: {vocab_size} must be in [1, min({vs}, {vt})]")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    div_id = DIVERGENCE_IDS[divergence]
    beta = float(beta)
    if div_id == 2:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta: must be in (0, 1) for jsd, got {beta}")
        log_1mb, log_b = math.log1p(-beta), math.log(beta)
    else:
        beta, log_1mb, log_b = 0.5, 0.0, 0.0  # unused by the kernel
    return vocab_size, 1.0 / temperature, div_id, beta, log_1mb, log_b


def row_forward(student, teacher, vocab_size, temperature, divergence, beta):
    """Per-row stats (float32 (4, N): lse_s, lse_t, d, aux) per the contract in backends.py."""
    _check_logits("student", student)
    _check_logits("teacher", teacher)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"teacher: {teacher.shape[0]} rows but student has {student.shape[0]}")
    if student.device != teacher.device:
        raise ValueError(f"teacher: on {teacher.device} but student on {student.device}")
    interpreted = _is_interpreted(_row_forward_kernel)
    _check_device(student, interpreted)
    vocab_size, inv_tau, div_id, beta, log_1mb, log_b = _common_args(
        vocab_size, temperature, divergence, beta, student.shape[1], teacher.shape[1]
    )
    n = student.shape[0]
    stats = torch.empty((4, n), dtype=torch.float32, device=student.device)
    if n == 0:
        return stats
    student, teacher = _rows(student), _rows(teacher)
    args = (
        student, teacher, stats,
        student.stride(0), teacher.stride(0), stats.stride(0), stats.stride(1),
        vocab_size, inv_tau, beta, log_1mb, log_b,
    )
    if _autotune_requested(interpreted):
        _autotuned(_row_forward_kernel)[(n,)](*args, DIVERGENCE=div_id)
    else:
        block, warps = _launch_config(vocab_size, interpreted, backward=False)
        _row_forward_kernel[(n,)](*args, DIVERGENCE=div_id, BLOCK_V=block, num_warps=warps)
    return stats


def row_backward(student, teacher, stats, coef, vocab_size, temperature, divergence, beta,
                 grad_student, grad_teacher):
    """Write coef * dd/dz into grad_student (and grad_teacher unless None), per backends.py."""
    _check_logits("student", student)
    _check_logits("teacher", teacher)
    n = student.shape[0]
    if teacher.shape[0] != n:
        raise ValueError(f"teacher: {teacher.shape[0]} rows but student has {n}")
    interpreted = _is_interpreted(_row_backward_kernel)
    _check_device(student, interpreted)
    vocab_size, inv_tau, div_id, beta, log_1mb, log_b = _common_args(
        vocab_size, temperature, divergence, beta, student.shape[1], teacher.shape[1]
    )
    if stats.shape != (4, n) or stats.dtype != torch.float32:
        raise ValueError(f"stats: expected float32 (4, {n}), got {stats.dtype} {tuple(stats.shape)}")
    if coef.shape != (n,) or coef.dtype != torch.float32:
        raise ValueError(f"coef: expected float32 ({n},), got {coef.dtype} {tuple(coef.shape)}")
    if grad_student.shape != student.shape or grad_student.dtype != student.dtype:
        raise ValueError("grad_student: must have the shape and dtype of student")
    if grad_teacher is not None and (grad_teacher.shape != teacher.shape or grad_teacher.dtype != teacher.dtype):
        raise ValueError("grad_teacher: must have the shape and dtype of teacher")
    for name, t in (("teacher", teacher), ("stats", stats), ("coef", coef), ("grad_student", grad_student),
                    ("grad_teacher", grad_teacher)):
        if t is not None and t.device != student.device:
            raise ValueError(f"{name}: on {t.device} but student on {student.device}")
    if n == 0:
        return None
    student, teacher = _rows(student), _rows(teacher)
    # The kernel writes rows with a unit column stride; anything else goes through a contiguous buffer.
    out_s = grad_student if grad_student.stride(-1) == 1 or grad_student.shape[1] <= 1 else torch.empty_like(
        grad_student, memory_format=torch.contiguous_format)
    out_t = grad_teacher
    if grad_teacher is not None and grad_teacher.stride(-1) != 1 and grad_teacher.shape[1] > 1:
        out_t = torch.empty_like(grad_teacher, memory_format=torch.contiguous_format)
    has_gt = out_t is not None
    args = (
        student, teacher, stats, coef, out_s, out_t if has_gt else out_s,
        student.stride(0), teacher.stride(0), stats.stride(0), stats.stride(1), coef.stride(0),
        out_s.stride(0), (out_t if has_gt else out_s).stride(0),
        out_s.shape[1], (out_t if has_gt else out_s).shape[1],
        vocab_size, inv_tau, beta, log_1mb, log_b,
    )
    if _autotune_requested(interpreted):
        _autotuned(_row_backward_kernel)[(n,)](*args, DIVERGENCE=div_id, HAS_GRAD_TEACHER=has_gt,
                                               SOFT_BF16=False)
    else:
        block, warps = _launch_config(vocab_size, interpreted, backward=True)
        _row_backward_kernel[(n,)](*args, DIVERGENCE=div_id, HAS_GRAD_TEACHER=has_gt, SOFT_BF16=interpreted,
                                   BLOCK_V=block, num_warps=warps)
    if out_s is not grad_student:
        grad_student.copy_(out_s)
    if has_gt and out_t is not grad_teacher:
        grad_teacher.copy_(out_t)
    return None
