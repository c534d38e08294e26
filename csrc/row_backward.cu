// The row backward of fused_window_kl as a CUDA kernel, plus a host launcher of the same code.
// The gradient math: row_backward_math.cuh; its derivation and the row contract:
// topd_kernels/rows/contract.py.
//
// Kernel layout: grid (rows, column chunks), one block of kThreads threads per (row, chunk). For the
// usual large N there is one chunk per row (whole row per block); small N splits the row over several
// blocks so that the GPU stays busy. Each thread handles kVec consecutive columns per step with 16-byte
// loads/stores when every row start (of the inputs and of the gradients) is 16-byte aligned, else a
// scalar path; tails are scalar. Gradient rows are addressed like input rows: (b, t) through their own
// strides, so the gradients may be views such as the rows of a longer tensor's gradient.
#include "row_backward.h"
#include "row_backward_math.cuh"

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace topd {

namespace {

constexpr int kThreads = 256;

template <typename T> struct Tag { using type = T; };

template <typename F>
void dispatch_dtype(int code, F&& f) {
    switch (code) {
        case kFloat32: f(Tag<float>{}); break;
        case kBFloat16: f(Tag<__nv_bfloat16>{}); break;
        case kFloat16: f(Tag<__half>{}); break;
        default: throw std::invalid_argument("unknown dtype code " + std::to_string(code));
    }
}

template <typename F>
void dispatch_all(const BackwardCall& c, F&& f) {
    dispatch_dtype(c.student_dtype, [&](auto ts) {
        dispatch_dtype(c.teacher_dtype, [&](auto tt) {
            switch (c.divergence) {
                case kReverseKL: f(ts, tt, std::integral_constant<int, kReverseKL>{}); break;
                case kForwardKL: f(ts, tt, std::integral_constant<int, kForwardKL>{}); break;
                case kJSD: f(ts, tt, std::integral_constant<int, kJSD>{}); break;
                default: throw std::invalid_argument("unknown divergence code");
            }
        });
    });
}

int64_t elem_size(int code) { return code == kFloat32 ? 4 : 2; }

// A dim of size 1 never steps, so its stride does not matter (torch may give it any value).
bool stride_aligned16(int64_t size, int64_t stride, int64_t esize) {
    return size <= 1 || (stride * esize) % 16 == 0;
}

// Every row (b, t) of a (batch, length, .) tensor at `base` starts 16-byte aligned.
bool rows_aligned16(const BackwardCall& c, uintptr_t base, int64_t stride_b, int64_t stride_t, int64_t esize) {
    return base % 16 == 0 && stride_aligned16(c.batch, stride_b, esize) && stride_aligned16(c.length, stride_t, esize);
}

// No two rows of a (batch, length, width) tensor with these (non-negative) strides share an element: the
// dims that step, taken by increasing stride, each step past everything the dims inside them span (any
// order: a transposed (T, B) layout is fine).
bool rows_disjoint(int64_t batch, int64_t length, int64_t width, int64_t stride_b, int64_t stride_t) {
    if (batch == 0 || length == 0) return true;   // no rows
    int64_t inner_stride = stride_t, inner_size = length, outer_stride = stride_b, outer_size = batch;
    if (length <= 1 || (batch > 1 && stride_b < stride_t)) {
        inner_stride = stride_b, inner_size = batch, outer_stride = stride_t, outer_size = length;
    }
    int64_t extent = width;   // elements spanned by one row
    if (inner_size > 1) {
        if (inner_stride < extent) return false;
        if (inner_stride > (INT64_MAX - extent) / (inner_size - 1)) return outer_size <= 1;   // span > int64
        extent += inner_stride * (inner_size - 1);
    }
    return outer_size <= 1 || outer_stride >= extent;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int64_t n_rows(const BackwardCall& c) { return c.batch * c.length; }

RowArgs make_args(const BackwardCall& c) {
    RowArgs a;
    a.student = reinterpret_cast<const void*>(c.student);
    a.teacher = reinterpret_cast<const void*>(c.teacher);
    a.stats = reinterpret_cast<const float*>(c.stats);
    a.coef = reinterpret_cast<const float*>(c.coef);
    a.grad_student = reinterpret_cast<void*>(c.grad_student);
    a.grad_teacher = c.grad_teacher ? reinterpret_cast<void*>(c.grad_teacher) : nullptr;
    a.n_rows = n_rows(c);
    a.length = c.length;
    a.vocab_size = c.vocab_size;
    a.s_width = c.s_width;
    a.t_width = c.t_width;
    a.s_stride_b = c.s_stride_b;
    a.s_stride_t = c.s_stride_t;
    a.t_stride_b = c.t_stride_b;
    a.t_stride_t = c.t_stride_t;
    a.gs_stride_b = c.gs_stride_b;
    a.gs_stride_t = c.gs_stride_t;
    a.gt_stride_b = c.gt_stride_b;
    a.gt_stride_t = c.gt_stride_t;
    a.stats_s0 = c.stats_s0;
    a.stats_s1 = c.stats_s1;
    a.coef_s0 = c.coef_s0;
    a.inv_tau = static_cast<float>(1.0 / c.temperature);
    const double beta = c.divergence == kJSD ? c.beta : 0.5;   // unused outside jsd
    a.dc.beta = static_cast<float>(beta);
    a.dc.one_minus_beta = static_cast<float>(1.0 - beta);
    a.dc.log_beta = static_cast<float>(std::log(beta));
    a.dc.log_one_minus_beta = static_cast<float>(std::log1p(-beta));
    // The vector path needs every row start 16-byte aligned: the base and the steps of both row dims of
    // each input and of each output (the gradients have strides of their own).
    const int64_t es = elem_size(c.student_dtype), et = elem_size(c.teacher_dtype);
    a.vec_ok = rows_aligned16(c, c.student, c.s_stride_b, c.s_stride_t, es) &&
               rows_aligned16(c, c.teacher, c.t_stride_b, c.t_stride_t, et) &&
               rows_aligned16(c, c.grad_student, c.gs_stride_b, c.gs_stride_t, es) &&
               (c.grad_teacher == 0 || rows_aligned16(c, c.grad_teacher, c.gt_stride_b, c.gt_stride_t, et));
    a.chunk_cols = 0;
    return a;
}

int64_t out_width(const BackwardCall& c) {
    return c.grad_teacher && c.t_width > c.s_width ? c.t_width : c.s_width;
}

template <typename TS, typename TT, int DIV>
__global__ void __launch_bounds__(kThreads) row_backward_kernel(RowArgs a, int64_t width) {
    const int64_t row = blockIdx.x;
    const int64_t c0 = static_cast<int64_t>(blockIdx.y) * a.chunk_cols;
    const int64_t c1 = c0 + a.chunk_cols < width ? c0 + a.chunk_cols : width;
    backward_row_chunk<TS, TT, DIV>(a, row, c0, c1, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        cudaGetLastError();   // clear a sticky-free error so later calls start clean
        throw std::runtime_error(std::string("topd_kernels CUDA backward: ") + what + ": " +
                                 cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
    }
}

}  // namespace

int block_threads() { return kThreads; }

std::string validate(const BackwardCall& c) {
    if (c.student_dtype < 0 || c.student_dtype >= kNumDTypes) return "student_dtype: unknown dtype code";
    if (c.teacher_dtype < 0 || c.teacher_dtype >= kNumDTypes) return "teacher_dtype: unknown dtype code";
    if (c.divergence < 0 || c.divergence >= kNumDivergences) return "divergence: unknown divergence code";
    if (!(c.temperature > 0.0) || !std::isfinite(c.temperature)) return "temperature: must be finite and > 0";
    if (c.divergence == kJSD && !(c.beta > 0.0 && c.beta < 1.0)) return "beta: must be in (0, 1) for jsd";
    if (c.batch < 0 || c.length < 0) return "batch, length: must be >= 0";
    if (c.length > 0 && c.batch > 2147483647LL / c.length) return "batch * length: must be < 2**31 rows";
    if (c.vocab_size < 1 || c.vocab_size > c.s_width || c.vocab_size > c.t_width)
        return "vocab_size: must be in [1, min(student width, teacher width)]";
    if (c.s_stride_b < 0 || c.s_stride_t < 0 || c.t_stride_b < 0 || c.t_stride_t < 0 || c.gs_stride_b < 0 ||
        c.gs_stride_t < 0 || c.gt_stride_b < 0 || c.gt_stride_t < 0 || c.stats_s0 < 0 || c.stats_s1 < 0 ||
        c.coef_s0 < 0)
        return "strides: must be >= 0";
    if (!rows_disjoint(c.batch, c.length, c.s_width, c.gs_stride_b, c.gs_stride_t))
        return "grad_student: rows overlap (every row is written)";
    if (c.grad_teacher && !rows_disjoint(c.batch, c.length, c.t_width, c.gt_stride_b, c.gt_stride_t))
        return "grad_teacher: rows overlap (every row is written)";
    if (c.chunk_cols < 0 || c.chunk_cols % kVec != 0) return "chunk_cols: must be 0 or a positive multiple of 8";
    if (n_rows(c) > 0 && (c.student == 0 || c.teacher == 0 || c.stats == 0 || c.coef == 0 || c.grad_student == 0))
        return "null address";
    return "";
}

namespace {
void require_valid(const BackwardCall& c) {
    const std::string why = validate(c);
    if (!why.empty()) throw std::invalid_argument("topd_kernels._cuda_backward: " + why);
}
}  // namespace

void launch_cuda(const BackwardCall& c, uintptr_t stream, int device) {
    require_valid(c);
    const int64_t width = out_width(c), rows = n_rows(c);
    if (rows == 0) return;

    int current = -1;
    check(cudaGetDevice(&current), "cudaGetDevice");
    if (current != device) check(cudaSetDevice(device), "cudaSetDevice");
    struct Restore {
        int dev, prev;
        ~Restore() { if (dev != prev && prev >= 0) cudaSetDevice(prev); }
    } restore{device, current};

    RowArgs a = make_args(c);
    int64_t chunk = c.chunk_cols;
    if (chunk == 0) {
        int sms = 0;
        check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
        const int64_t target = static_cast<int64_t>(sms > 0 ? sms : 1) * (2048 / kThreads) * 2;
        int64_t chunks = (target + rows - 1) / rows;
        const int64_t max_chunks = (width + kVec * kThreads - 1) / (kVec * kThreads);   // >= one step per thread
        if (chunks > max_chunks) chunks = max_chunks;
        if (chunks < 1) chunks = 1;
        chunk = round_up((width + chunks - 1) / chunks, kVec);
    }
    int64_t n_chunks = (width + chunk - 1) / chunk;
    if (n_chunks > 65535) {   // grid.y limit: widen the chunks
        chunk = round_up((width + 65534) / 65535, kVec);
        n_chunks = (width + chunk - 1) / chunk;
    }
    a.chunk_cols = chunk;

    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(n_chunks));
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    dispatch_all(c, [&](auto ts, auto tt, auto div) {
        using TS = typename decltype(ts)::type;
        using TT = typename decltype(tt)::type;
        row_backward_kernel<TS, TT, decltype(div)::value><<<grid, kThreads, 0, s>>>(a, width);
    });
    check(cudaGetLastError(), "kernel launch");
}

void run_host(const BackwardCall& c, int emulated_threads) {
    require_valid(c);
    if (emulated_threads < 1)
        throw std::invalid_argument("topd_kernels._cuda_backward: emulated_threads: must be >= 1");
    const int64_t width = out_width(c), rows = n_rows(c);
    if (rows == 0) return;
    RowArgs a = make_args(c);
    a.chunk_cols = c.chunk_cols ? c.chunk_cols : round_up(width, kVec);
    dispatch_all(c, [&](auto ts, auto tt, auto div) {
        using TS = typename decltype(ts)::type;
        using TT = typename decltype(tt)::type;
        for (int64_t row = 0; row < rows; ++row)
            for (int64_t c0 = 0; c0 < width; c0 += a.chunk_cols) {
                const int64_t c1 = c0 + a.chunk_cols < width ? c0 + a.chunk_cols : width;
                for (int tid = 0; tid < emulated_threads; ++tid)
                    backward_row_chunk<TS, TT, decltype(div)::value>(a, row, c0, c1, tid, emulated_threads);
            }
    });
}

}  // namespace topd
