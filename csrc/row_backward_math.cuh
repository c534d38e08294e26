// Per-element gradient math of the row backward, shared by the CUDA kernel and the host launcher.
//
// Everything in this header is `__host__ __device__`: the CUDA kernel (row_backward.cu) and the host
// launcher that the CPU CI runs (same file) call exactly the same functions, so the host build checks
// the arithmetic that runs on the GPU (float32 throughout; bf16/fp16 conversions round to nearest even
// on both sides, via cuda_bf16.h / cuda_fp16.h).
//
// The gradients written here are derived once, in topd_kernels/rows/contract.py ("Gradients"). In short,
// per row, with log p = (z - max z) / tau - logsum from the saved statistics (Stat rows MAX_*, LOGSUM_*):
//   reverse_kl  dd/da_s = p_s (log p_s - log p_t - d)              dd/da_t = p_t - p_s
//   forward_kl  dd/da_s = p_s - p_t                                dd/da_t = p_t (log p_t - log p_s - d)
//   jsd         dd/da_s = (1 - beta) p_s (log p_s - log m - K_s)   dd/da_t = beta p_t (log p_t - log m - K_t)
//               log m = logaddexp(log(1 - beta) + log p_s, log(beta) + log p_t); K_s, K_t = MIX_S, MIX_T
// and grad_z = coef / tau * dd/da. A term p * (...) with p == 0 is 0 (never 0 * inf). Rows with
// coef == 0 are written as exact zeros without reading the logits; columns >= V get 0.
//
// Why (z - max z) / tau - logsum and not z / tau - lse: z - max z is exact near the maximum (where p is
// not negligible), so log p keeps float32 accuracy whatever the common offset of the logits (z ~ 1e4).
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>
#include <stdexcept>

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "row_backward.h"   // the Divergence, Stat and DType codes

#define TOPD_HD __host__ __device__ __forceinline__

namespace topd {

// Elements handled per vector step: 16 bytes of a 2-byte type, 32 bytes (two 16-byte accesses) of fp32.
constexpr int kVec = 8;

// ---- dtype conversions (float32 arithmetic; round to nearest even on the way back) ----------------
template <typename T> struct Cvt;
template <> struct Cvt<float> {
    static TOPD_HD float to_float(float x) { return x; }
    static TOPD_HD float from_float(float x) { return x; }
};
template <> struct Cvt<__nv_bfloat16> {
    static TOPD_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    static TOPD_HD __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
    static TOPD_HD uint32_t bits(float x) { const __nv_bfloat16_raw r = __float2bfloat16_rn(x); return r.x; }
};
template <> struct Cvt<__half> {
    static TOPD_HD float to_float(__half x) { return __half2float(x); }
    static TOPD_HD __half from_float(float x) { return __float2half_rn(x); }
    static TOPD_HD uint32_t bits(float x) { const __half_raw r = __float2half_rn(x); return r.x; }
};

// ---- 16-byte vector loads / stores (caller guarantees 16-byte alignment) ---------------------------
// The host build checks that guarantee (memcpy would hide a misaligned access that faults on the GPU).
TOPD_HD void check_aligned16(const void* p) {
#ifndef __CUDA_ARCH__
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
        throw std::logic_error("topd_kernels: misaligned 16-byte vector access (host check of the CUDA code)");
#endif
    (void)p;
}

template <typename T>
TOPD_HD void load_vec(const T* __restrict__ p, float (&out)[kVec]) {
    static_assert((kVec * sizeof(T)) % 16 == 0, "vector of kVec elements must be whole 16-byte words");
    constexpr int kWords = kVec * sizeof(T) / 16;
    uint4 w[kWords];
    check_aligned16(p);
#ifdef __CUDA_ARCH__
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);   // 16-byte read-only loads
#else
    std::memcpy(w, p, sizeof(w));
#endif
    alignas(16) T e[kVec];
#ifdef __CUDA_ARCH__
#pragma unroll
    for (int i = 0; i < kVec; ++i) e[i] = reinterpret_cast<const T*>(w)[i];
#else
    std::memcpy(e, w, sizeof(e));
#endif
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = Cvt<T>::to_float(e[i]);
}

TOPD_HD uint32_t f2u(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u;
#endif
}

template <typename T>
TOPD_HD void store_word(T* p, int word, const uint4 w) {
#ifdef __CUDA_ARCH__
    __stwb(reinterpret_cast<uint4*>(p) + word, w);   // one 16-byte store (a plain `=` may be split)
#else
    std::memcpy(reinterpret_cast<char*>(p) + 16 * word, &w, sizeof(w));
#endif
}

// Rounds kVec floats to T (nearest even) and stores them as 16-byte words, packed in registers so that
// the compiler emits 128-bit stores.
template <typename T>
TOPD_HD void store_vec(T* __restrict__ p, const float (&in)[kVec]) {
    check_aligned16(p);
    if constexpr (sizeof(T) == 2) {
        uint4 w;
        w.x = Cvt<T>::bits(in[0]) | (Cvt<T>::bits(in[1]) << 16);
        w.y = Cvt<T>::bits(in[2]) | (Cvt<T>::bits(in[3]) << 16);
        w.z = Cvt<T>::bits(in[4]) | (Cvt<T>::bits(in[5]) << 16);
        w.w = Cvt<T>::bits(in[6]) | (Cvt<T>::bits(in[7]) << 16);
        store_word(p, 0, w);
    } else {
        static_assert(sizeof(T) == 4, "float32");
        store_word(p, 0, make_uint4(f2u(in[0]), f2u(in[1]), f2u(in[2]), f2u(in[3])));
        store_word(p, 1, make_uint4(f2u(in[4]), f2u(in[5]), f2u(in[6]), f2u(in[7])));
    }
}

// ---- per-row constants ------------------------------------------------------------------------------
struct RowConsts {
    float max_s, logsum_s;   // student: log p_s = (z_s - max_s) * inv_tau - logsum_s
    float max_t, logsum_t;   // teacher, likewise
    float d;                 // the row's divergence
    float k_s, k_t;          // jsd: KL(p_s || m), KL(p_t || m)
    float inv_tau;
    float scale;             // coef / tau
};

// Divergence-wide constants (one set per call).
struct DivConsts {
    float beta, one_minus_beta;   // jsd mixing weight
    float log_beta, log_one_minus_beta;
};

TOPD_HD float logaddexp(float a, float b) {
    const float m = fmaxf(a, b);
    if (m == -INFINITY) return -INFINITY;          // both -inf (also avoids -inf - -inf = NaN)
    return m + log1pf(expf(-fabsf(a - b)));
}

// The constants of row `row` from the statistics: element [k, row] at stats[k * s0 + row * s1].
TOPD_HD RowConsts make_row_consts(const float* __restrict__ stats, int64_t s0, int64_t s1, int64_t row,
                                  float coef, float inv_tau) {
    const float* st = stats + row * s1;
    RowConsts r;
    r.max_s = st[kMaxS * s0];
    r.logsum_s = st[kLogsumS * s0];
    r.max_t = st[kMaxT * s0];
    r.logsum_t = st[kLogsumT * s0];
    r.d = st[kKL * s0];
    r.k_s = st[kMixS * s0];
    r.k_t = st[kMixT * s0];
    r.inv_tau = inv_tau;
    r.scale = coef * inv_tau;
    return r;
}

// log p of one logit: (z - max) * inv_tau - logsum (z - max is exact where p matters).
TOPD_HD float log_prob(float z, float max_z, float logsum, float inv_tau) {
    return (z - max_z) * inv_tau - logsum;
}

// The gradients dd/dz (times coef) of one element, from its two logits. `gs`, `gt` receive the results.
template <int DIV>
TOPD_HD void grad_element(float zs, float zt, const RowConsts& r, const DivConsts& dc, float& gs, float& gt) {
    const float lps = log_prob(zs, r.max_s, r.logsum_s, r.inv_tau);
    const float lpt = log_prob(zt, r.max_t, r.logsum_t, r.inv_tau);
    const float ps = expf(lps);
    const float pt = expf(lpt);
    float das, dat;
    if (DIV == kReverseKL) {
        das = ps == 0.f ? 0.f : ps * (lps - lpt - r.d);
        dat = pt - ps;
    } else if (DIV == kForwardKL) {
        das = ps - pt;
        dat = pt == 0.f ? 0.f : pt * (lpt - lps - r.d);
    } else {  // kJSD
        const float lm = logaddexp(dc.log_one_minus_beta + lps, dc.log_beta + lpt);
        das = ps == 0.f ? 0.f : dc.one_minus_beta * ps * (lps - lm - r.k_s);
        dat = pt == 0.f ? 0.f : dc.beta * pt * (lpt - lm - r.k_t);
    }
    gs = r.scale * das;
    gt = r.scale * dat;
}

// ---- one row, one column chunk ----------------------------------------------------------------------
// All pointers are typed, strides in elements, int64 indexing throughout.
struct RowArgs {
    const void* student;
    const void* teacher;
    const float* stats;      // (NUM_STATS, N): element [k, i] at stats[k * stats_s0 + i * stats_s1]
    const float* coef;       // (N,): coef[i * coef_s0]
    void* grad_student;      // (B, T, s_width): row (b, t) at b * gs_stride_b + t * gs_stride_t
    void* grad_teacher;      // (B, T, t_width): row (b, t) at b * gt_stride_b + t * gt_stride_t; nullptr: not wanted
    int64_t n_rows, length, vocab_size, s_width, t_width;
    int64_t s_stride_b, s_stride_t, t_stride_b, t_stride_t;   // row i = (i / length, i % length)
    int64_t gs_stride_b, gs_stride_t, gt_stride_b, gt_stride_t;
    int64_t stats_s0, stats_s1, coef_s0;
    int64_t chunk_cols;      // columns per (row, chunk) work item; a multiple of kVec
    float inv_tau;
    DivConsts dc;
    bool vec_ok;             // every row start 16-byte aligned (inputs and gradients)
};

template <typename T>
TOPD_HD void zero_fill(T* __restrict__ row, int64_t c0, int64_t c1, bool vec_ok, int tid, int nthr) {
    if (c1 <= c0) return;
    int64_t col = c0;
    if (vec_ok && (c0 % kVec) == 0) {
        const int64_t nvec = (c1 - c0) / kVec;
        float z[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) z[i] = 0.f;
        for (int64_t i = tid; i < nvec; i += nthr) store_vec<T>(row + c0 + i * kVec, z);
        col = c0 + nvec * kVec;
    }
    for (int64_t j = col + tid; j < c1; j += nthr) row[j] = Cvt<T>::from_float(0.f);
}

// Writes grad_student[b, t, c0:c1] and grad_teacher[b, t, c0:c1] of row = (b, t) (clipped to each width),
// nothing else of the gradients; work item of thread `tid` of `nthr` cooperating threads (a CUDA block, or
// one host loop).
template <typename TS, typename TT, int DIV>
TOPD_HD void backward_row_chunk(const RowArgs& a, int64_t row, int64_t c0, int64_t c1, int tid, int nthr) {
    const int64_t b = row / a.length, t = row % a.length;
    TS* __restrict__ gs = static_cast<TS*>(a.grad_student) + b * a.gs_stride_b + t * a.gs_stride_t;
    TT* __restrict__ gt =
        a.grad_teacher ? static_cast<TT*>(a.grad_teacher) + b * a.gt_stride_b + t * a.gt_stride_t : nullptr;
    const int64_t s_end = c1 < a.s_width ? c1 : a.s_width;
    const int64_t t_end = c1 < a.t_width ? c1 : a.t_width;
    const float coef = a.coef[row * a.coef_s0];

    if (coef == 0.f) {   // masked row: exact zeros, logits never read (they may be NaN / inf)
        zero_fill<TS>(gs, c0, s_end, a.vec_ok, tid, nthr);
        if (gt) zero_fill<TT>(gt, c0, t_end, a.vec_ok, tid, nthr);
        return;
    }

    const RowConsts r = make_row_consts(a.stats, a.stats_s0, a.stats_s1, row, coef, a.inv_tau);
    const TS* __restrict__ zs = static_cast<const TS*>(a.student) + b * a.s_stride_b + t * a.s_stride_t;
    const TT* __restrict__ zt = static_cast<const TT*>(a.teacher) + b * a.t_stride_b + t * a.t_stride_t;
    const int64_t v_end = c1 < a.vocab_size ? c1 : a.vocab_size;

    int64_t col = c0;
    if (a.vec_ok && v_end > c0 && (c0 % kVec) == 0) {
        const int64_t nvec = (v_end - c0) / kVec;
        for (int64_t i = tid; i < nvec; i += nthr) {
            const int64_t j = c0 + i * kVec;
            float xs[kVec], xt[kVec], os[kVec], ot[kVec];
            load_vec<TS>(zs + j, xs);
            load_vec<TT>(zt + j, xt);
#pragma unroll
            for (int k = 0; k < kVec; ++k) grad_element<DIV>(xs[k], xt[k], r, a.dc, os[k], ot[k]);
            store_vec<TS>(gs + j, os);
            if (gt) store_vec<TT>(gt + j, ot);
        }
        col = c0 + nvec * kVec;
    }
    for (int64_t j = col + tid; j < v_end; j += nthr) {   // scalar path: unaligned rows and the tail
        float os, ot;
        grad_element<DIV>(Cvt<TS>::to_float(zs[j]), Cvt<TT>::to_float(zt[j]), r, a.dc, os, ot);
        gs[j] = Cvt<TS>::from_float(os);
        if (gt) gt[j] = Cvt<TT>::from_float(ot);
    }
    // vocabulary padding: columns [V, width) get 0
    const int64_t p0 = c0 > a.vocab_size ? c0 : a.vocab_size;
    zero_fill<TS>(gs, p0, s_end, a.vec_ok, tid, nthr);
    if (gt) zero_fill<TT>(gt, p0, t_end, a.vec_ok, tid, nthr);
}

}  // namespace topd
