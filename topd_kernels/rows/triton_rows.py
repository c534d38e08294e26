"""Triton row backend: `row_forward` / `row_backward` / `row_mix` of the row contract (`contract.py`), registered
as the ops `topd::triton_row_forward` / `topd::triton_row_backward` / `topd::triton_row_mix` (`OPS`).

One Triton program handles one row (one token position) and streams over its vocabulary in blocks of
BLOCK_V columns. Nothing of size N x V is ever allocated: the caller hands in the gradients.

Rows are read in place from (B, T, V) views: program i is the row (b, t) = divmod(i, T), which starts at
b * stride_batch + t * stride_position (int64 arithmetic: the offsets pass 2^31 for N = 16384,
V = 151936), separately for student and teacher; the last dimension has stride 1 (the contract). Inputs
may be float32 / bfloat16 / float16 (student and teacher independently) with different last-dim sizes;
only the first `vocab_size` columns are read. The backward writes the gradients in place the same way:
rows (b, t) of (B, T, V) tensors the caller allocated, with strides of their own on the first two dims
(such as the rows of the gradient of a longer tensor, grad_base[:, :-1]), int64 offsets, every row in
full. Every load is converted to float32 at once (bf16 arithmetic is wrong under the Triton
interpreter, and float32 is what we want on the GPU anyway).

Block size / warps: a fixed default chosen from the vocabulary size (`_launch_config`; the forward on a GPU
with 8 columns per thread, `_forward_warps`). Two environment switches, read once at import:
TOPD_TRITON_BLOCK_V (a power of two >= 16) overrides the block size (`BLOCK_V_OVERRIDE`; tests monkeypatch
the constant to force many blocks per row); TOPD_TRITON_AUTOTUNE=1 autotunes over a small config set on a
GPU (`AUTOTUNE`; never under the interpreter, where one big block per row keeps the tests fast).

Machine code: `benchmarks/kernel_stats.py` compiles every kernel variant for sm_90 without a GPU and
reports instructions per element pair, registers, spills and access widths (benchmarks/results/).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner

from ..config import DIVERGENCE_CODES
from .contract import NUM_STATS, RowCall, Stat, define_row_ops

__all__ = ["row_forward", "row_backward", "row_mix", "OPS", "INTERPRETED", "BLOCK_V_OVERRIDE", "AUTOTUNE"]

# The divergence selects code inside the kernels (a constexpr); the codes are the contract's.
_REVERSE_KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["reverse_kl"])
_FORWARD_KL: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["forward_kl"])
_JSD: tl.constexpr = tl.constexpr(DIVERGENCE_CODES["jsd"])
# Rows of the (NUM_STATS, N) statistics tensor (contract.Stat).
_MAX_S: tl.constexpr = tl.constexpr(int(Stat.MAX_S))
_LOGSUM_S: tl.constexpr = tl.constexpr(int(Stat.LOGSUM_S))
_MAX_T: tl.constexpr = tl.constexpr(int(Stat.MAX_T))
_LOGSUM_T: tl.constexpr = tl.constexpr(int(Stat.LOGSUM_T))
_KL: tl.constexpr = tl.constexpr(int(Stat.KL))
_MIX_S: tl.constexpr = tl.constexpr(int(Stat.MIX_S))
_MIX_T: tl.constexpr = tl.constexpr(int(Stat.MIX_T))
_ENTROPY_S: tl.constexpr = tl.constexpr(int(Stat.ENTROPY_S))
_TAIL_S: tl.constexpr = tl.constexpr(int(Stat.TAIL_S))


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
# Notation for one row: a_s = z_s / tau, a_t = z_t / tau over v < V; log p_x = a_x - log sum_v exp(a_x).
#
# Online log-sum-exp (per model x in {s, t}). After the blocks seen so far we hold the running max
# M_x (of a_x; kept as the max of the raw logits z_x, M_x = max z_x / tau) and the running sum
# L_x = sum_v exp(a_x - M_x). A new block with maximum b raises the max to M'_x = max(M_x, b); the old
# sum is rescaled by alpha_x = exp(M_x - M'_x) and the block adds sum exp(a_x - M'_x). (While M_x is
# still -inf -- every entry so far -inf -- L_x = 0 and alpha_x is taken as 1 (careful path, below) or
# comes out as exp(-inf) = 0 (fast path); entries at -inf add exp(-inf) = 0, the shift taken against 0
# instead of M'_x while M'_x = -inf, so that -inf - -inf never reaches a sum.)
# Stored (contract.Stat): MAX_x = max z_x (the raw logits) and LOGSUM_x = log L_x, so that
#     log p_x = (z_x - MAX_x) / tau - LOGSUM_x.
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
# log L_t at the size of the log-probabilities instead of the size of the logits. The kernel keeps X in
# raw logit units, X_raw = tau X = sum_v e_v (d_s - d_t) with d_x = z_x - max z_x = tau l_x, so the update
# reads X'_raw = alpha_s (X_raw + L_s ((m_s - m_t) - (m'_s - m'_t))) + sum_block e'_v (d'_s - d'_t) on the
# raw maxima m = tau M, and X = X_raw / tau once at the end.
# Terms with p_s = 0 (a_s = -inf) contribute 0 (tl.where, never 0 * inf). A position with p_s > 0 and
# p_t = 0 makes the divergence +inf: it is flagged (b_inf_hit) and left out of X, and d = +inf.
#
# Forward KL, one pass: the mirror image, X = sum_v exp(a_t - M_t) (l_t - l_s), rescaled by alpha_t,
#     d = X / L_t - log L_t + log L_s,  +inf when p_t > 0 where p_s = 0.
#
# The student's entropy (every divergence, in the same pass): E = sum_v e_v l_s, the cross term with no second
# model (rescaled as X with M_t fixed: E' = alpha_s (E + L_s (M_s - M'_s)) + sum_block e'_v l'_s), and
#     H = -sum_v p_s log p_s = log L_s - E / L_s,  stored as ENTROPY_S.
#
# JSD, two passes. mix = (1 - beta) p_s + beta p_t needs the *normalised* probabilities, and
# log mix = log((1-beta) exp(a_s - lse_s) + beta exp(a_t - lse_t)) does not factor into a running
# quantity that can be rescaled when lse_s and lse_t move independently (the ratio of the two
# normalisers changes the shape of the mixture inside the log). So pass 1 computes MAX_x and LOGSUM_x
# with the online log-sum-exp, and pass 2 re-reads the row (mostly from memory: with one or two ~600 KB
# rows (bf16, V = 151936) in flight per SM, 80-160 MB against an H100's 50 MB of L2, the first read is
# mostly evicted by then) and accumulates
#     K_s = sum_v p_s (log p_s - log mix),  K_t = sum_v p_t (log p_t - log mix),
#     d = beta K_t + (1 - beta) K_s,  stored as KL, MIX_S = K_s and MIX_T = K_t,
# with log mix = logaddexp(log(1-beta) + log p_s, log(beta) + log p_t), evaluated as
# hi + log(1 + exp(lo - hi)) and -inf when both are -inf; p * (...) with p = 0 is 0.
#
# Precision. The maxima are tracked on the raw logits z (dividing by tau > 0 keeps the order) and only
# shifted differences are scaled: l = (z - max z) * (1/tau), and exp(l) = exp2((z - max z) * (log2(e)/tau)).
# The rounding of the scaling (and of 1/tau itself) is then relative to the size of the log-probabilities,
# not to the size of the logits, which keeps d, LOGSUM and the backward's log p = (z - MAX) / tau - LOGSUM
# as accurate as a plain float32 log_softmax whatever the common offset of the logits (z ~ 1e4 included):
# no quantity of the size of max z / tau is ever formed (in particular z * (log2(e)/tau) - max z * (...)
# is never used in place of (z - max z) * (log2(e)/tau)).
#
# Chunks. The running state (M_x, L_x, X, the inf flag) is kept per chunk of _CHUNK = 8 consecutive columns
# of a block: a block is a (BLOCK_V / 8, 8) tensor, chunk c covers columns v0 + 8c ... v0 + 8c + 7 of every
# block v0, and on a GPU one chunk is one thread's 16-byte bf16 load (8 columns per thread, `_forward_warps`).
# Each chunk runs the online update above over its own columns, so a block needs no reduction across threads
# (no shuffles, no shared memory, no barriers in the loop). After the loops the chunk states are combined into
# the row's with the same rescaling, from each chunk's maxima m_c to the row's m = max_c m_c:
#     L_x = sum_c alpha_c,x L_c,x,  X_raw = sum_c alpha_c,p (X_c + L_c,p ((m_c,p - m_p) - (m_c,q - m_q))),
# alpha_c,x = exp((m_c,x - m_x) / tau), 0 for a chunk whose max is still -inf (its L is 0), and the inf
# flag is the max over the chunks.
#
# Fast and careful paths (the math above is the same on both):
# - Fast path: every full block [0, V - V % BLOCK_V), loaded without masks (16-byte loads whatever V is).
#   Per element: d_x = z_x - m'_x (raw units), e_x = exp2(d_x * log2(e)/tau) (one MUFU.EX2, which flushes
#   results below 2^-126 to 0: probabilities below 1e-38 of the chunk maximum's, which changes no sum) and
#   e_p (d_p - d_q). No -inf handling at all: with every entry finite, every term is finite. An entry at
#   -inf (or a chunk whose entries so far are all -inf, or a NaN / +inf logit) makes the chunk's state
#   non-finite instead -- e_p (d_p - d_q) is 0 * -inf or e * inf, d_x is NaN when m'_x = -inf -- and a
#   non-finite state stays non-finite through the rescaling. (JSD pass 1 only sums, and an entry at -inf
#   adds exp2(-inf) = 0 there: only the all -inf start and non-finite logits poison a chunk.)
# - Careful path: the update exactly as derived above, with the tl.where handling of -inf entries. After
#   the fast loop, the chunks with a non-finite state (tested once per row) are reset and their columns of
#   every full block are redone on the careful path (masked loads: the other chunks read nothing, and a
#   block of -inf leaves a careful state unchanged: m' = m, alpha = 1, no term); the last, partial block
#   always takes it (masked loads padded with -inf, which contribute nothing and set no inf flag since
#   z_p > -inf is false there). Rows without -inf never run careful code in their main loop, and a row
#   with a few -inf entries re-reads only the 8-column chunks that met them.
# A per-block test instead (a block with -inf branches to the careful path) needs a reduction across the
# thread block in every iteration (shuffles, shared memory, two barriers): measured with
# benchmarks/kernel_stats.py, ~3 of the ~22 instructions per pair of that variant.
#
# Masked rows (mask[i] False) read nothing (the block loops run up to 0 instead of vocab_size) and store
# exact zeros in every statistic.
@triton.jit
def _row_start(p_base, i_b, i_t, stride_b, stride_t):
    """Pointer to row (i_b, i_t) (int64) of a (B, T, V) tensor with these batch and position strides."""
    return p_base + i_b * stride_b + i_t * stride_t


# Columns per chunk: a block of BLOCK_V columns is handled as BLOCK_V / _CHUNK chunks of _CHUNK consecutive
# columns (a (BLOCK_V / _CHUNK, _CHUNK) tensor; one 16-byte bf16 load, held by one thread), each with a
# running state of its own (see "Chunks" above).
_CHUNK: tl.constexpr = tl.constexpr(8)


@triton.jit
def _kl_cross_step(b_cross, b_inf_hit, b_z_p, b_z_q, b_e_p, b_d_p, b_d_q, b_sum_p, b_alpha_p, b_max_moves, b_max_q):
    """One careful block of KL(p || q)'s cross term X = sum_v e_p (d_p - d_q) (raw units; reverse KL: p = s,
    q = t; forward KL: p = t, q = s) per chunk, rescaled to the new maxima as derived above. Block tensors are
    (chunks, _CHUNK), chunk states (chunks,); b_max_moves = (M_p - M'_p) - (M_q - M'_q) on the raw logits;
    b_max_q is q's maximum before this block. Returns (X', inf_hit'): entries with p > 0 = q set the chunk's
    inf_hit (d = +inf) and stay out of X; entries with p = 0 add nothing (padding columns are loaded as -inf
    for both models, so they add nothing and set nothing)."""
    neg_inf = float("-inf")
    m_p = b_z_p > neg_inf
    m_q = b_z_q > neg_inf
    b_inf_hit = tl.maximum(b_inf_hit, tl.max(tl.where(m_p & ~m_q, 1.0, 0.0), axis=1))
    b_term = tl.where(m_p & m_q, b_e_p * (b_d_p - b_d_q), 0.0)
    b_corr = tl.where((b_sum_p > 0) & (b_max_q > neg_inf), b_sum_p * b_max_moves, 0.0)
    return b_alpha_p * (b_cross + b_corr) + tl.sum(b_term, axis=1), b_inf_hit


@triton.jit
def _careful_block(b_max_s, b_max_t, b_sum_s, b_sum_t, b_cross, b_ent, b_inf_hit, b_z_s, b_z_t, scale2,
                   DIVERGENCE: tl.constexpr):
    """The careful path of one block: (chunks, _CHUNK) logits, entries at -inf handled exactly. Takes and
    returns the chunk states (M_s, M_t, L_s, L_t, X, E, inf_hit), each of shape (chunks,)."""
    neg_inf = float("-inf")
    b_new_max_s = tl.maximum(b_max_s, tl.max(b_z_s, axis=1))
    b_new_max_t = tl.maximum(b_max_t, tl.max(b_z_t, axis=1))
    # alpha = exp(M - M'); 1 while the max is still -inf (the sums are 0 then)
    b_alpha_s = tl.where(b_new_max_s == neg_inf, 1.0, tl.exp2((b_max_s - b_new_max_s) * scale2))
    b_alpha_t = tl.where(b_new_max_t == neg_inf, 1.0, tl.exp2((b_max_t - b_new_max_t) * scale2))
    # z - M' (raw units), -inf where z = -inf: against 0 instead of M' in a chunk whose max is still -inf
    # (every entry -inf), so that -inf - -inf never occurs and exp2 gives exactly 0 for every -inf entry.
    b_d_s = b_z_s - tl.where(b_new_max_s == neg_inf, 0.0, b_new_max_s)[:, None]
    b_d_t = b_z_t - tl.where(b_new_max_t == neg_inf, 0.0, b_new_max_t)[:, None]
    b_e_s = tl.exp2(b_d_s * scale2)
    b_e_t = tl.exp2(b_d_t * scale2)
    if DIVERGENCE == _REVERSE_KL:
        b_cross, b_inf_hit = _kl_cross_step(b_cross, b_inf_hit, b_z_s, b_z_t, b_e_s, b_d_s, b_d_t, b_sum_s, b_alpha_s,
                                            (b_max_s - b_new_max_s) - (b_max_t - b_new_max_t), b_max_t)
    elif DIVERGENCE == _FORWARD_KL:
        b_cross, b_inf_hit = _kl_cross_step(b_cross, b_inf_hit, b_z_t, b_z_s, b_e_t, b_d_t, b_d_s, b_sum_t, b_alpha_t,
                                            (b_max_t - b_new_max_t) - (b_max_s - b_new_max_s), b_max_s)
    b_ent = b_alpha_s * (b_ent + tl.where(b_sum_s > 0, b_sum_s * (b_max_s - b_new_max_s), 0.0)) + \
        tl.sum(tl.where(b_z_s > neg_inf, b_e_s * b_d_s, 0.0), axis=1)
    return (b_new_max_s, b_new_max_t, b_alpha_s * b_sum_s + tl.sum(b_e_s, axis=1),
            b_alpha_t * b_sum_t + tl.sum(b_e_t, axis=1), b_cross, b_ent, b_inf_hit)


@triton.jit
def _jsd_mix_pass(p_s_row, p_t_row, b_end, vocab_size, b_max_s, b_log_sum_s, b_max_t, b_log_sum_t, inv_temperature,
                  log_one_minus_beta, log_beta, BLOCK_V: tl.constexpr):
    """JSD pass 2 over the columns [0, b_end) of one row, with the normalisers given (MAX_x, LOGSUM_x: the
    row's own in the forward kernel, the whole rows' in the mix kernel). Returns (K_s, K_t)."""
    o_v = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    b_mix_s = tl.zeros((), tl.float32)
    b_mix_t = tl.zeros((), tl.float32)
    # log p = (z - max z) / tau - log L, relative to the row maximum.
    for v0 in tl.range(0, b_end, BLOCK_V):
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
        b_mix_s += tl.sum(tl.where(b_p_s > 0, b_p_s * (b_lp_s - b_log_mix), 0.0), axis=0)  # K_s
        b_mix_t += tl.sum(tl.where(b_p_t > 0, b_p_t * (b_lp_t - b_log_mix), 0.0), axis=0)  # K_t
    return b_mix_s, b_mix_t


@triton.jit
def _row_forward_kernel(
    p_student,  # *fp32/bf16/fp16: student logits (B, T, Vs); row (b, t) at b * stride_student_b + t * stride_student_t
    p_teacher,  # *fp32/bf16/fp16: teacher logits (B, T, Vt); row (b, t) at b * stride_teacher_b + t * stride_teacher_t
    p_mask,  # *u8 (N,): the row mask (bool viewed as uint8); entry i at i * stride_mask
    p_stats,  # *fp32 (NUM_STATS, N) output, rows contract.Stat; (k, i) at k * stride_stats_k + i * stride_stats_n
    stride_student_b,  # int: elements between consecutive batch entries of the student
    stride_student_t,  # int: elements between consecutive positions of the student (last dim has stride 1)
    stride_teacher_b,  # int: elements between consecutive batch entries of the teacher
    stride_teacher_t,  # int: elements between consecutive positions of the teacher (last dim has stride 1)
    length,  # int: T, positions per batch entry (row i is (i // T, i % T))
    stride_mask,  # int: elements between consecutive mask entries
    stride_stats_k,  # int: elements between the NUM_STATS stats rows
    stride_stats_n,  # int: elements between consecutive entries of a stats row
    vocab_size,  # int: V, the number of columns read from each row (<= both last dims)
    inv_temperature,  # fp32: 1 / tau
    beta,  # fp32: jsd mixture weight of the teacher (unused otherwise)
    log_one_minus_beta,  # fp32: log(1 - beta) (jsd only)
    log_beta,  # fp32: log(beta) (jsd only)
    DIVERGENCE: tl.constexpr,  # config.DIVERGENCE_CODES: 0 reverse_kl, 1 forward_kl, 2 jsd (selects code)
    BLOCK_V: tl.constexpr,  # columns per block (power of two)
):
    i_n = tl.program_id(0).to(tl.int64)  # row index; int64 so that the row offsets cannot overflow
    i_b = i_n // length  # batch entry of the row
    i_t = i_n % length  # position of the row
    p_s_row = _row_start(p_student, i_b, i_t, stride_student_b, stride_student_t)
    p_t_row = _row_start(p_teacher, i_b, i_t, stride_teacher_b, stride_teacher_t)

    b_valid = tl.load(p_mask + i_n * stride_mask) != 0
    b_end = tl.where(b_valid, vocab_size, 0)  # columns read: none on a masked row
    b_full_end = b_end // BLOCK_V * BLOCK_V  # the full blocks [0, b_full_end) take the fast path
    o_blk = tl.arange(0, BLOCK_V // _CHUNK)[:, None] * _CHUNK + tl.arange(0, _CHUNK)[None, :]  # (chunks, _CHUNK)

    neg_inf = float("-inf")
    scale2 = inv_temperature * 1.4426950408889634  # log2(e) / tau: exp((z - M) / tau) = exp2((z - M) * scale2)
    # Chunk states (see "Chunks" above). Maxima of the raw logits; only shifted differences are scaled.
    b_max_s = tl.full((BLOCK_V // _CHUNK,), neg_inf, tl.float32)  # running max of z_s (M_s = b_max_s / tau)
    b_max_t = tl.full((BLOCK_V // _CHUNK,), neg_inf, tl.float32)  # running max of z_t (M_t = b_max_t / tau)
    b_sum_s = tl.zeros((BLOCK_V // _CHUNK,), tl.float32)  # running L_s = sum exp(a_s - M_s)
    b_sum_t = tl.zeros((BLOCK_V // _CHUNK,), tl.float32)  # running L_t = sum exp(a_t - M_t)
    b_cross = tl.zeros((BLOCK_V // _CHUNK,), tl.float32)  # running cross term X (reverse / forward KL), raw units
    b_ent = tl.zeros((BLOCK_V // _CHUNK,), tl.float32)  # running E = sum e_s (z_s - M_s), raw units (the entropy)
    b_inf_hit = tl.zeros((BLOCK_V // _CHUNK,), tl.float32)  # 1 where some p_x > 0 meets p_other = 0 (d = +inf)

    for v0 in tl.range(0, b_full_end, BLOCK_V):
        # Fast path (see "Fast and careful paths" above): unmasked loads of a full block, no -inf handling.
        b_z_s = tl.load(p_s_row + v0 + o_blk).to(tl.float32)
        b_z_t = tl.load(p_t_row + v0 + o_blk).to(tl.float32)
        b_new_max_s = tl.maximum(b_max_s, tl.max(b_z_s, axis=1))
        b_new_max_t = tl.maximum(b_max_t, tl.max(b_z_t, axis=1))
        b_d_s = b_z_s - b_new_max_s[:, None]  # z - M' in raw units
        b_d_t = b_z_t - b_new_max_t[:, None]
        b_e_s = tl.exp2(b_d_s * scale2)  # exp(a - M')
        b_e_t = tl.exp2(b_d_t * scale2)
        # alpha = exp(M - M'): 0 while M = -inf (no block seen: the sum it scales is 0, and the cross term's
        # correction, -inf - -inf there, is left out by the b_sum > 0 test)
        b_alpha_s = tl.exp2((b_max_s - b_new_max_s) * scale2)
        b_alpha_t = tl.exp2((b_max_t - b_new_max_t) * scale2)
        if DIVERGENCE == _REVERSE_KL:
            b_corr = tl.where(b_sum_s > 0, b_sum_s * ((b_max_s - b_new_max_s) - (b_max_t - b_new_max_t)), 0.0)
            b_cross = b_alpha_s * (b_cross + b_corr) + tl.sum(b_e_s * (b_d_s - b_d_t), axis=1)
        elif DIVERGENCE == _FORWARD_KL:
            b_corr = tl.where(b_sum_t > 0, b_sum_t * ((b_max_t - b_new_max_t) - (b_max_s - b_new_max_s)), 0.0)
            b_cross = b_alpha_t * (b_cross + b_corr) + tl.sum(b_e_t * (b_d_t - b_d_s), axis=1)
        b_ent = b_alpha_s * (b_ent + tl.where(b_sum_s > 0, b_sum_s * (b_max_s - b_new_max_s), 0.0)) + \
            tl.sum(b_e_s * b_d_s, axis=1)
        b_sum_s = b_alpha_s * b_sum_s + tl.sum(b_e_s, axis=1)
        b_sum_t = b_alpha_t * b_sum_t + tl.sum(b_e_t, axis=1)
        b_max_s = b_new_max_s
        b_max_t = b_new_max_t

    # Chunks whose fast-path state is not finite saw an entry at -inf or a non-finite logit: start them again
    # and redo their columns of every full block on the careful path (the other chunks' loads are masked off:
    # an all -inf block leaves a careful state unchanged). Checked once per row (NaN < inf is false).
    m_redo = ~(tl.abs(b_sum_s + b_sum_t + b_cross + b_ent) < float("inf"))
    if tl.max(m_redo.to(tl.int32), axis=0) > 0:
        b_max_s = tl.where(m_redo, neg_inf, b_max_s)
        b_max_t = tl.where(m_redo, neg_inf, b_max_t)
        b_sum_s = tl.where(m_redo, 0.0, b_sum_s)
        b_sum_t = tl.where(m_redo, 0.0, b_sum_t)
        b_cross = tl.where(m_redo, 0.0, b_cross)
        b_ent = tl.where(m_redo, 0.0, b_ent)
        for v0 in tl.range(0, b_full_end, BLOCK_V):  # kernel_stats: rare (rows with -inf / non-finite logits)
            m_load = m_redo[:, None] & (o_blk >= 0)
            b_z_s = tl.load(p_s_row + v0 + o_blk, mask=m_load, other=neg_inf).to(tl.float32)
            b_z_t = tl.load(p_t_row + v0 + o_blk, mask=m_load, other=neg_inf).to(tl.float32)
            b_max_s, b_max_t, b_sum_s, b_sum_t, b_cross, b_ent, b_inf_hit = _careful_block(
                b_max_s, b_max_t, b_sum_s, b_sum_t, b_cross, b_ent, b_inf_hit, b_z_s, b_z_t, scale2, DIVERGENCE)

    if b_full_end < b_end:
        # The last, partial block: masked loads padded with -inf, careful path.
        o_col = b_full_end + o_blk
        m_col = o_col < vocab_size
        b_z_s = tl.load(p_s_row + o_col, mask=m_col, other=neg_inf).to(tl.float32)
        b_z_t = tl.load(p_t_row + o_col, mask=m_col, other=neg_inf).to(tl.float32)
        b_max_s, b_max_t, b_sum_s, b_sum_t, b_cross, b_ent, b_inf_hit = _careful_block(
            b_max_s, b_max_t, b_sum_s, b_sum_t, b_cross, b_ent, b_inf_hit, b_z_s, b_z_t, scale2, DIVERGENCE)

    # Combine the chunk states into the row's: the same rescaling, from each chunk's maxima to the row's.
    b_row_max_s = tl.max(b_max_s, axis=0)
    b_row_max_t = tl.max(b_max_t, axis=0)
    b_alpha_s = tl.where(b_max_s == neg_inf, 0.0, tl.exp2((b_max_s - b_row_max_s) * scale2))  # 0: L of the chunk is 0
    b_alpha_t = tl.where(b_max_t == neg_inf, 0.0, tl.exp2((b_max_t - b_row_max_t) * scale2))
    if DIVERGENCE == _REVERSE_KL:
        b_corr = tl.where((b_sum_s > 0) & (b_max_t > neg_inf),
                          b_sum_s * ((b_max_s - b_row_max_s) - (b_max_t - b_row_max_t)), 0.0)
        b_cross_row = tl.sum(b_alpha_s * (b_cross + b_corr), axis=0) * inv_temperature  # X in nats
    elif DIVERGENCE == _FORWARD_KL:
        b_corr = tl.where((b_sum_t > 0) & (b_max_s > neg_inf),
                          b_sum_t * ((b_max_t - b_row_max_t) - (b_max_s - b_row_max_s)), 0.0)
        b_cross_row = tl.sum(b_alpha_t * (b_cross + b_corr), axis=0) * inv_temperature
    else:
        b_cross_row = 0.0
    b_sum_row_s = tl.sum(b_alpha_s * b_sum_s, axis=0)
    b_sum_row_t = tl.sum(b_alpha_t * b_sum_t, axis=0)
    b_ent_row = tl.sum(b_alpha_s * (b_ent + tl.where(b_sum_s > 0, b_sum_s * (b_max_s - b_row_max_s), 0.0)), axis=0)

    b_log_sum_s = tl.log(b_sum_row_s)  # LOGSUM_S = log L_s
    b_entropy = b_log_sum_s - b_ent_row * inv_temperature / b_sum_row_s  # H = log L_s - E / L_s
    b_log_sum_t = tl.log(b_sum_row_t)  # LOGSUM_T = log L_t
    b_mix_s = tl.zeros((), tl.float32)
    b_mix_t = tl.zeros((), tl.float32)

    if DIVERGENCE == _REVERSE_KL:
        b_d = b_cross_row / b_sum_row_s - b_log_sum_s + b_log_sum_t
        b_d = tl.where(tl.max(b_inf_hit, axis=0) > 0, float("inf"), b_d)
    elif DIVERGENCE == _FORWARD_KL:
        b_d = b_cross_row / b_sum_row_t - b_log_sum_t + b_log_sum_s
        b_d = tl.where(tl.max(b_inf_hit, axis=0) > 0, float("inf"), b_d)
    else:
        # JSD pass 2: needs the final normalisers (see the derivation above).
        b_mix_s, b_mix_t = _jsd_mix_pass(p_s_row, p_t_row, b_end, vocab_size, b_row_max_s, b_log_sum_s, b_row_max_t,
                                         b_log_sum_t, inv_temperature, log_one_minus_beta, log_beta, BLOCK_V)
        b_d = beta * b_mix_t + (1.0 - beta) * b_mix_s

    # Masked rows: exact zeros (their loops ran no step: -inf maxima and log-sums, NaN d, all replaced here).
    p_out = p_stats + i_n * stride_stats_n
    tl.store(p_out + _MAX_S * stride_stats_k, tl.where(b_valid, b_row_max_s, 0.0))
    tl.store(p_out + _LOGSUM_S * stride_stats_k, tl.where(b_valid, b_log_sum_s, 0.0))
    tl.store(p_out + _MAX_T * stride_stats_k, tl.where(b_valid, b_row_max_t, 0.0))
    tl.store(p_out + _LOGSUM_T * stride_stats_k, tl.where(b_valid, b_log_sum_t, 0.0))
    tl.store(p_out + _KL * stride_stats_k, tl.where(b_valid, b_d, 0.0))
    tl.store(p_out + _MIX_S * stride_stats_k, tl.where(b_valid, b_mix_s, 0.0))
    tl.store(p_out + _MIX_T * stride_stats_k, tl.where(b_valid, b_mix_t, 0.0))
    tl.store(p_out + _ENTROPY_S * stride_stats_k, tl.where(b_valid, b_entropy, 0.0))
    tl.store(p_out + _TAIL_S * stride_stats_k, 0.0)  # top-k rows only


# Vocabulary-parallel jsd (vocab_parallel.py): JSD pass 2 alone, over one rank's columns, with the normalisers of
# the whole rows read from the statistics (MAX_x, LOGSUM_x) instead of computed. Stored: (2, N) = (K_s, K_t),
# exact zeros on masked rows (which read nothing).
@triton.jit
def _row_mix_kernel(
    p_student,  # *fp32/bf16/fp16: student logits (B, T, Vs); row (b, t) at b * stride_student_b + t * stride_student_t
    p_teacher,  # *fp32/bf16/fp16: teacher logits (B, T, Vt); row (b, t) at b * stride_teacher_b + t * stride_teacher_t
    p_mask,  # *u8 (N,): the row mask (bool viewed as uint8); entry i at i * stride_mask
    p_stats,  # *fp32 (NUM_STATS, N) input, rows contract.Stat; (k, i) at k * stride_stats_k + i * stride_stats_n
    p_mix,  # *fp32 (2, N) output: K_s, K_t; (k, i) at k * stride_mix_k + i * stride_mix_n
    stride_student_b,  # int: elements between consecutive batch entries of the student
    stride_student_t,  # int: elements between consecutive positions of the student (last dim has stride 1)
    stride_teacher_b,  # int: elements between consecutive batch entries of the teacher
    stride_teacher_t,  # int: elements between consecutive positions of the teacher (last dim has stride 1)
    length,  # int: T, positions per batch entry (row i is (i // T, i % T))
    stride_mask,  # int: elements between consecutive mask entries
    stride_stats_k,  # int: elements between the NUM_STATS stats rows
    stride_stats_n,  # int: elements between consecutive entries of a stats row
    stride_mix_k,  # int: elements between the two output rows
    stride_mix_n,  # int: elements between consecutive entries of an output row
    vocab_size,  # int: V, the number of columns read from each row (<= both last dims)
    inv_temperature,  # fp32: 1 / tau
    beta,  # fp32: jsd mixture weight of the teacher (unused: K_s and K_t are stored apart)
    log_one_minus_beta,  # fp32: log(1 - beta)
    log_beta,  # fp32: log(beta)
    BLOCK_V: tl.constexpr,  # columns per block (power of two)
):
    i_n = tl.program_id(0).to(tl.int64)  # row index; int64 so that the row offsets cannot overflow
    i_b = i_n // length  # batch entry of the row
    i_t = i_n % length  # position of the row
    p_s_row = _row_start(p_student, i_b, i_t, stride_student_b, stride_student_t)
    p_t_row = _row_start(p_teacher, i_b, i_t, stride_teacher_b, stride_teacher_t)
    b_valid = tl.load(p_mask + i_n * stride_mask) != 0
    b_end = tl.where(b_valid, vocab_size, 0)  # columns read: none on a masked row
    p_st = p_stats + i_n * stride_stats_n
    b_mix_s, b_mix_t = _jsd_mix_pass(p_s_row, p_t_row, b_end, vocab_size, tl.load(p_st + _MAX_S * stride_stats_k),
                                     tl.load(p_st + _LOGSUM_S * stride_stats_k), tl.load(p_st + _MAX_T * stride_stats_k),
                                     tl.load(p_st + _LOGSUM_T * stride_stats_k), inv_temperature, log_one_minus_beta,
                                     log_beta, BLOCK_V)
    p_out = p_mix + i_n * stride_mix_n
    tl.store(p_out, tl.where(b_valid, b_mix_s, 0.0))
    tl.store(p_out + stride_mix_k, tl.where(b_valid, b_mix_t, 0.0))


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
# Per row we write g_s = coef * dd/dz_s (and g_t = coef * dd/dz_t) = coef / tau * dd/da, with the
# formulas of contract.py ("Gradients": the one derivation). The probabilities are recomputed from the
# forward's statistics, relative to the row maximum (see "Precision" above; no second reduction):
#     log p_x = (z_x - MAX_x) / tau - LOGSUM_x,
#     reverse_kl  dd/da_s = p_s (log p_s - log p_t - d),             dd/da_t = p_t - p_s
#     forward_kl  dd/da_s = p_s - p_t,                               dd/da_t = p_t (log p_t - log p_s - d)
#     jsd         dd/da_s = (1-beta) p_s (log p_s - log mix - K_s),  dd/da_t = beta p_t (log p_t - log mix - K_t)
# with d = KL, K_s = MIX_S and K_t = MIX_T read from the statistics (K_t is its own statistic: recovering
# it from d and K_s would cancel for small beta).
# Every p * (...) with p = 0 is written as 0 with tl.where (an entry at -inf contributes nothing).
# Rows with coef == 0 skip the loads and store exact zeros (tl.where, never NaN * 0); columns
# >= vocab_size of each gradient are stored as zeros. Every row of each gradient is written in full and
# nothing else: the gradients are (B, T, V*) tensors the caller allocated with strides of their own on the
# first two dims (the rows of a larger gradient, such as grad_base[:, :-1]), addressed like the inputs,
# row (b, t) at b * stride_b + t * stride_t in int64, last dim stride 1.
@triton.jit
def _row_backward_kernel(
    p_student,  # *fp32/bf16/fp16: student logits (B, T, Vs); row (b, t) at b * stride_student_b + t * stride_student_t
    p_teacher,  # *fp32/bf16/fp16: teacher logits (B, T, Vt); row (b, t) at b * stride_teacher_b + t * stride_teacher_t
    p_stats,  # *fp32 (NUM_STATS, N) from row_forward (contract.Stat); (k, i) at k * stride_stats_k + i * stride_stats_n
    p_coef,  # *fp32 (N,): per-row multiplier; entry i at i * stride_coef
    p_grad_student,  # *dtype of student: (B, T, Vs) output; row (b, t) at b * stride_gs_b + t * stride_gs_t
    p_grad_teacher,  # *dtype of teacher: (B, T, Vt) output; row (b, t) at b * stride_gt_b + t * stride_gt_t
    stride_student_b,  # int: elements between consecutive batch entries of the student
    stride_student_t,  # int: elements between consecutive positions of the student (last dim has stride 1)
    stride_teacher_b,  # int: elements between consecutive batch entries of the teacher
    stride_teacher_t,  # int: elements between consecutive positions of the teacher (last dim has stride 1)
    stride_gs_b,  # int: elements between consecutive batch entries of grad_student
    stride_gs_t,  # int: elements between consecutive positions of grad_student (last dim has stride 1)
    stride_gt_b,  # int: elements between consecutive batch entries of grad_teacher (unused unless HAS_GRAD_TEACHER)
    stride_gt_t,  # int: elements between consecutive positions of grad_teacher (unused unless HAS_GRAD_TEACHER)
    length,  # int: T, positions per batch entry (row i is (i // T, i % T))
    stride_stats_k,  # int: elements between the NUM_STATS stats rows
    stride_stats_n,  # int: elements between consecutive entries of a stats row
    stride_coef,  # int: elements between consecutive coef entries
    width_student,  # int: Vs, last dim of student and grad_student (columns >= vocab_size are zero-filled)
    width_teacher,  # int: Vt, last dim of teacher and grad_teacher
    vocab_size,  # int: V, columns that carry gradient
    inv_temperature,  # fp32: 1 / tau
    beta,  # fp32: jsd mixture weight of the teacher (unused otherwise)
    log_one_minus_beta,  # fp32: log(1 - beta) (jsd only)
    log_beta,  # fp32: log(beta) (jsd only)
    DIVERGENCE: tl.constexpr,  # config.DIVERGENCE_CODES: 0 reverse_kl, 1 forward_kl, 2 jsd (selects code)
    HAS_GRAD_TEACHER: tl.constexpr,  # whether to write the teacher gradient (selects code)
    SOFT_BF16: tl.constexpr,  # round fp32 -> bf16 by hand (True only under the interpreter, which truncates)
    BLOCK_V: tl.constexpr,  # columns per block (power of two)
):
    i_n = tl.program_id(0).to(tl.int64)  # row index; int64 offsets
    i_b = i_n // length  # batch entry of the row
    i_t = i_n % length  # position of the row
    p_s_row = _row_start(p_student, i_b, i_t, stride_student_b, stride_student_t)
    p_t_row = _row_start(p_teacher, i_b, i_t, stride_teacher_b, stride_teacher_t)
    p_gs_row = _row_start(p_grad_student, i_b, i_t, stride_gs_b, stride_gs_t)
    p_gt_row = _row_start(p_grad_teacher, i_b, i_t, stride_gt_b, stride_gt_t)
    o_v = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    b_coef = tl.load(p_coef + i_n * stride_coef)
    b_live = b_coef != 0.0  # rows with coef == 0 read nothing and write exact zeros
    b_load_end = tl.where(b_live, vocab_size, 0)  # columns < b_load_end are read (none when coef == 0)
    p_st = p_stats + i_n * stride_stats_n
    b_max_s = tl.load(p_st + _MAX_S * stride_stats_k)
    b_log_sum_s = tl.load(p_st + _LOGSUM_S * stride_stats_k)
    b_max_t = tl.load(p_st + _MAX_T * stride_stats_k)
    b_log_sum_t = tl.load(p_st + _LOGSUM_T * stride_stats_k)
    b_d = tl.load(p_st + _KL * stride_stats_k)
    b_k_s = tl.load(p_st + _MIX_S * stride_stats_k)  # jsd: K_s = KL(p_s || mix)
    b_k_t = tl.load(p_st + _MIX_T * stride_stats_k)  # jsd: K_t = KL(p_t || mix)
    b_scale = b_coef * inv_temperature  # coef * d a / d z

    # Padding columns [vocab_size, width) get no gradient. Written before the main loop (disjoint columns):
    # written after it, the widths stayed live across the loop and ptxas spilled one (sm_90, bf16, reverse_kl).
    b_zero = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in tl.range(vocab_size, width_student, BLOCK_V):
        o_col = v0 + o_v
        m_col = o_col < width_student
        tl.store(p_gs_row + o_col, b_zero.to(p_grad_student.dtype.element_ty), mask=m_col)
    if HAS_GRAD_TEACHER:
        for v0 in tl.range(vocab_size, width_teacher, BLOCK_V):
            o_col = v0 + o_v
            m_col = o_col < width_teacher
            tl.store(p_gt_row + o_col, b_zero.to(p_grad_teacher.dtype.element_ty), mask=m_col)

    for v0 in tl.range(0, vocab_size, BLOCK_V):
        o_col = v0 + o_v
        m_col = o_col < vocab_size
        m_load = o_col < b_load_end
        b_z_s = tl.load(p_s_row + o_col, mask=m_load, other=neg_inf).to(tl.float32)
        b_z_t = tl.load(p_t_row + o_col, mask=m_load, other=neg_inf).to(tl.float32)
        b_lp_s = (b_z_s - b_max_s) * inv_temperature - b_log_sum_s
        b_lp_t = (b_z_t - b_max_t) * inv_temperature - b_log_sum_t
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
            b_g_s = tl.where(b_p_s > 0, (1.0 - beta) * b_p_s * (b_lp_s - b_log_mix - b_k_s), 0.0)
            b_g_t = tl.where(b_p_t > 0, beta * b_p_t * (b_lp_t - b_log_mix - b_k_t), 0.0)
        b_g_s = tl.where(b_live, b_scale * b_g_s, 0.0)
        tl.store(p_gs_row + o_col, _to_output(b_g_s, p_grad_student.dtype.element_ty, SOFT_BF16), mask=m_col)
        if HAS_GRAD_TEACHER:
            b_g_t = tl.where(b_live, b_scale * b_g_t, 0.0)
            tl.store(p_gt_row + o_col, _to_output(b_g_t, p_grad_teacher.dtype.element_ty, SOFT_BF16), mask=m_col)


# ---------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------
# Whether the kernels were decorated under TRITON_INTERPRET=1 (decided when this module imported): the
# one place the interpreter is detected (the registry asks it too).
INTERPRETED: bool = type(_row_forward_kernel).__name__ == "InterpretedFunction"


def _parse_block(raw: Optional[str]) -> Optional[int]:
    """TOPD_TRITON_BLOCK_V: None when unset or empty, else a power of two >= 16."""
    if not raw:
        return None
    try:
        block = int(raw)
    except ValueError:
        block = 0
    if block < 16 or block & (block - 1):
        raise ValueError(f"TOPD_TRITON_BLOCK_V must be a power of two >= 16, got {raw!r}")
    return block


# Environment switches, read once at import (tests monkeypatch these constants).
BLOCK_V_OVERRIDE: Optional[int] = _parse_block(os.environ.get("TOPD_TRITON_BLOCK_V"))
AUTOTUNE: bool = os.environ.get("TOPD_TRITON_AUTOTUNE", "0") == "1"


def _launch_config(vocab_size: int, interpreted: bool = INTERPRETED, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_V, num_warps): a fixed default per vocabulary range, or BLOCK_V_OVERRIDE.

    On a GPU: up to 4096 columns per block (forward: two fp32 rows of 4096 in registers; the backward
    holds more live values per column, so it stops at 4096 with 8 warps too). Under the interpreter the
    cost is per block step, so use one block per row up to 32768 columns.
    """
    override = BLOCK_V_OVERRIDE
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


def _use_autotune(interpreted: bool = INTERPRETED) -> bool:
    """AUTOTUNE, on a GPU only (the interpreter cannot benchmark)."""
    return AUTOTUNE and not interpreted


_AUTOTUNED: dict = {}


def _autotuned(kernel):
    """An autotuned wrapper of `kernel` (built lazily, only when autotuning on a GPU)."""
    if kernel not in _AUTOTUNED:
        configs = [
            triton.Config({"BLOCK_V": block}, num_warps=warps)
            for block in (1024, 2048, 4096, 8192)
            for warps in (4, 8, 16)
            if not (block == 1024 and warps == 16)
        ]
        # Keys: vocab_size and the kernel's code switches; argument dtypes are part of the autotuner key already.
        key = ["vocab_size"] + [name for name in ("DIVERGENCE", "HAS_GRAD_TEACHER") if name in kernel.arg_names]
        _AUTOTUNED[kernel] = triton.autotune(configs=configs, key=key)(kernel)
    return _AUTOTUNED[kernel]


def _kernel(kernel):
    """`kernel`, or its autotuned wrapper when autotuning (on a GPU)."""
    return _autotuned(kernel) if _use_autotune() else kernel


def _forward_warps(block: int, warps: int, interpreted: bool = INTERPRETED) -> int:
    """num_warps of the forward kernel for BLOCK_V = `block` (`warps`: _launch_config's): on a GPU, 8 columns
    per thread (one 16-byte chunk, see "Chunks" above its kernel) up to 16 warps; more columns per thread
    hold more registers (16 per thread: 80-110 registers on sm_90, benchmarks/kernel_stats.py)."""
    if interpreted:
        return warps
    return max(warps, min(16, block // (32 * _CHUNK.value)))


def _launch_options(kernel, vocab_size: int) -> dict:
    """BLOCK_V and num_warps of a launch of `kernel` (from `_kernel`); none when autotuned."""
    if isinstance(kernel, Autotuner):
        return {}
    block, warps = _launch_config(vocab_size, backward=kernel is _row_backward_kernel)
    if kernel is _row_forward_kernel:
        warps = _forward_warps(block, warps)
    return {"BLOCK_V": block, "num_warps": warps}


def _on_device(x: torch.Tensor):
    """Launch context: the tensors' CUDA device (kernels launch on the current device); none on the CPU."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _scalars(call: RowCall) -> tuple:
    """(vocab_size, 1 / tau, beta, log(1 - beta), log(beta)): the kernels' scalar arguments."""
    if call.divergence == DIVERGENCE_CODES["jsd"]:
        log_1mb, log_b = math.log1p(-call.beta), math.log(call.beta)
    else:
        log_1mb, log_b = 0.0, 0.0  # unused by the kernels
    return call.vocab_size, 1.0 / call.temperature, call.beta, log_1mb, log_b


def _row_strides(x: torch.Tensor) -> tuple:
    """(stride over the batch, stride over positions) of a (B, T, V) row tensor."""
    return x.stride(0), x.stride(1)


# ---------------------------------------------------------------------------------------------------
# The row contract (contract.py)
# ---------------------------------------------------------------------------------------------------
def row_forward(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, call: RowCall) -> torch.Tensor:
    """Row statistics (NUM_STATS, N) float32 per the contract; exact zeros on rows whose mask is False."""
    batch, length = student.shape[:2]
    n = batch * length
    stats = torch.empty((NUM_STATS, n), dtype=torch.float32, device=student.device)
    if n == 0:
        return stats
    mask_u8 = mask.view(torch.uint8)  # bool loads as bytes, the same on every Triton version
    args = (
        student, teacher, mask_u8, stats,
        *_row_strides(student), *_row_strides(teacher), length,
        mask_u8.stride(0), stats.stride(0), stats.stride(1),
        *_scalars(call),
    )
    # Launched through wrap_triton (a compiler tracing the op sees the kernel); `kernel` is assigned from the
    # kernel's global name so that torch.library.triton_op finds it in this source (its cache key).
    kernel = _kernel(_row_forward_kernel)
    with _on_device(student):
        wrap_triton(kernel)[(n,)](*args, DIVERGENCE=call.divergence, **_launch_options(kernel, call.vocab_size))
    return stats


def row_mix(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor,
            call: RowCall) -> torch.Tensor:
    """(K_s, K_t) (2, N) float32 per the contract: over the call's columns, with the normalisers of `stats`."""
    length = student.shape[1]
    n = student.shape[0] * length
    mixes = torch.empty((2, n), dtype=torch.float32, device=student.device)
    if n == 0:
        return mixes
    mask_u8 = mask.view(torch.uint8)
    kernel = _kernel(_row_mix_kernel)  # launched as in row_forward
    with _on_device(student):
        wrap_triton(kernel)[(n,)](
            student, teacher, mask_u8, stats, mixes, *_row_strides(student), *_row_strides(teacher), length,
            mask_u8.stride(0), *stats.stride(), *mixes.stride(), *_scalars(call),
            **_launch_options(kernel, call.vocab_size))
    return mixes


def row_backward(student: torch.Tensor, teacher: torch.Tensor, stats: torch.Tensor, coef: torch.Tensor,
                 call: RowCall, grad_student: torch.Tensor, grad_teacher: Optional[torch.Tensor]) -> None:
    """Write coef * dd/dz per the contract into grad_student (B, T, Vs) and grad_teacher (B, T, Vt) unless
    None: every row in full (zeros past vocab_size, exact zeros on rows with coef == 0), in place, whatever
    their (non-overlapping) strides on the first two dims; nothing outside their rows is touched."""
    want_teacher = grad_teacher is not None
    batch, length = student.shape[:2]
    n = batch * length
    if n == 0:
        return
    # Without a teacher gradient its pointer and strides are the student gradient's (never written): no null
    # pointer reaches the launcher.
    grad_teacher_or_dummy = grad_teacher if want_teacher else grad_student
    args = (
        student, teacher, stats, coef, grad_student, grad_teacher_or_dummy,
        *_row_strides(student), *_row_strides(teacher),
        *_row_strides(grad_student), *_row_strides(grad_teacher_or_dummy), length,
        stats.stride(0), stats.stride(1), coef.stride(0),
        student.shape[-1], teacher.shape[-1],
        *_scalars(call),
    )
    kernel = _kernel(_row_backward_kernel)  # launched as in row_forward
    with _on_device(student):
        wrap_triton(kernel)[(n,)](*args, DIVERGENCE=call.divergence, HAS_GRAD_TEACHER=want_teacher,
                                  SOFT_BF16=INTERPRETED, **_launch_options(kernel, call.vocab_size))


OPS = define_row_ops("triton", row_forward, row_backward, mix=row_mix, triton=True)
