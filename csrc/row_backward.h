// Plain C++ interface of the row-backward launchers (no CUDA or torch headers): raw addresses as
// integers, sizes and element strides, the CUDA stream as an integer. Implemented in row_backward.cu;
// exposed to Python by bindings.cpp; filled from tensors by topd_kernels/rows/cuda_rows.py.
//
// The tensors of a call are those of the row contract (topd_kernels/rows/contract.py):
//   student (B, T, Vs), teacher (B, T, Vt): any strides on the first two dims, stride 1 on the last;
//     row i is (b, t) = (i / T, i % T), its first element at b * stride_b + t * stride_t (elements).
//   stats (NUM_STATS, N) float32, coef (N,) float32, N = B * T, each with its own element strides.
//   grad_student (B, T, Vs), grad_teacher (B, T, Vt): outputs of the logits' dtypes, addressed like the
//     inputs (row (b, t) at b * stride_b + t * stride_t, their own strides, stride 1 on the last dim), rows
//     that do not overlap (e.g. the rows of the gradient of a longer tensor, grad_base[:, :-1]); every row
//     is written in full and nothing else.
#pragma once

#include <cstdint>
#include <string>

namespace topd {

// ---- Codes shared with Python (bindings.cpp exposes each table as a dict; a test checks them against
// ---- topd_kernels.config.DIVERGENCE_CODES and topd_kernels.rows.contract.Stat) ---------------------
// X(enumerator, Python name, value)
#define TOPD_DIVERGENCES(X)                                                                          \
    X(kReverseKL, "reverse_kl", 0)                                                                   \
    X(kForwardKL, "forward_kl", 1)                                                                   \
    X(kJSD, "jsd", 2)

// Rows of the statistics tensor (contract.Stat).
#define TOPD_STATS(X)                                                                                \
    X(kMaxS, "MAX_S", 0)                                                                             \
    X(kLogsumS, "LOGSUM_S", 1)                                                                       \
    X(kMaxT, "MAX_T", 2)                                                                             \
    X(kLogsumT, "LOGSUM_T", 3)                                                                       \
    X(kKL, "KL", 4)                                                                                  \
    X(kMixS, "MIX_S", 5)                                                                             \
    X(kMixT, "MIX_T", 6)                                                                             \
    X(kEntropyS, "ENTROPY_S", 7)                                                                     \
    X(kTailS, "TAIL_S", 8)

// Logit dtypes, by torch's name for them.
#define TOPD_DTYPES(X)                                                                               \
    X(kFloat32, "float32", 0)                                                                        \
    X(kBFloat16, "bfloat16", 1)                                                                      \
    X(kFloat16, "float16", 2)

#define TOPD_ENUMERATOR(name, py_name, value) name = value,
enum Divergence : int { TOPD_DIVERGENCES(TOPD_ENUMERATOR) };
enum Stat : int { TOPD_STATS(TOPD_ENUMERATOR) };
enum DType : int { TOPD_DTYPES(TOPD_ENUMERATOR) };
#undef TOPD_ENUMERATOR

#define TOPD_COUNT(name, py_name, value) +1
constexpr int kNumStats = 0 TOPD_STATS(TOPD_COUNT);
constexpr int kNumDivergences = 0 TOPD_DIVERGENCES(TOPD_COUNT);
constexpr int kNumDTypes = 0 TOPD_DTYPES(TOPD_COUNT);
#undef TOPD_COUNT

// ---- The call: every field once. X(type, name, default, description) -------------------------------
// This list generates the struct below and its Python class (bindings.cpp: one attribute per field).
#define TOPD_BACKWARD_CALL_FIELDS(X)                                                                 \
    X(uintptr_t, student, 0, "address of the student logits (B, T, Vs)")                             \
    X(uintptr_t, teacher, 0, "address of the teacher logits (B, T, Vt)")                             \
    X(uintptr_t, stats, 0, "address of the float32 statistics (NUM_STATS, N)")                       \
    X(uintptr_t, coef, 0, "address of the float32 row multipliers (N,)")                             \
    X(uintptr_t, grad_student, 0, "address of the output (B, T, Vs)")                                \
    X(uintptr_t, grad_teacher, 0, "address of the output (B, T, Vt); 0: not wanted")                 \
    X(int, student_dtype, 0, "dtype code of student and grad_student (dtype_codes)")                 \
    X(int, teacher_dtype, 0, "dtype code of teacher and grad_teacher (dtype_codes)")                 \
    X(int64_t, batch, 0, "B")                                                                        \
    X(int64_t, length, 0, "T; N = B * T rows")                                                       \
    X(int64_t, s_width, 0, "Vs: the student's last dim")                                             \
    X(int64_t, t_width, 0, "Vt: the teacher's last dim")                                             \
    X(int64_t, s_stride_b, 0, "student element stride of dim 0")                                     \
    X(int64_t, s_stride_t, 0, "student element stride of dim 1")                                     \
    X(int64_t, t_stride_b, 0, "teacher element stride of dim 0")                                     \
    X(int64_t, t_stride_t, 0, "teacher element stride of dim 1")                                     \
    X(int64_t, gs_stride_b, 0, "grad_student element stride of dim 0")                               \
    X(int64_t, gs_stride_t, 0, "grad_student element stride of dim 1")                               \
    X(int64_t, gt_stride_b, 0, "grad_teacher element stride of dim 0 (unused without grad_teacher)") \
    X(int64_t, gt_stride_t, 0, "grad_teacher element stride of dim 1 (unused without grad_teacher)") \
    X(int64_t, stats_s0, 0, "stats element stride between statistics")                               \
    X(int64_t, stats_s1, 1, "stats element stride between rows")                                     \
    X(int64_t, coef_s0, 1, "coef element stride")                                                    \
    X(int64_t, vocab_size, 1, "V: columns read, 1 <= V <= min(Vs, Vt)")                              \
    X(double, temperature, 1.0, "tau > 0")                                                           \
    X(int, divergence, 0, "divergence code (divergence_codes)")                                      \
    X(double, beta, 0.5, "jsd's mixture weight in (0, 1)")                                           \
    X(int64_t, chunk_cols, 0, "columns per work item, a multiple of 8; 0: chosen by the launcher")

#define TOPD_DECLARE_FIELD(type, name, default_value, doc) type name = default_value;
struct BackwardCall {
    TOPD_BACKWARD_CALL_FIELDS(TOPD_DECLARE_FIELD)
};
#undef TOPD_DECLARE_FIELD

// Checks the call; returns an empty string when valid, else the reason. The sizes and strides are
// trusted to describe the memory behind the addresses (the Python side takes them from the tensors).
std::string validate(const BackwardCall& c);

// Launches the CUDA kernel on `stream` (a cudaStream_t as an integer) of device `device`.
// Throws std::invalid_argument for an invalid call, std::runtime_error on a CUDA error (also when
// there is no GPU).
void launch_cuda(const BackwardCall& c, uintptr_t stream, int device);

// The same computation on the host (addresses are host memory), through the same __host__ __device__
// code; `emulated_threads` threads of a block are run one after the other.
void run_host(const BackwardCall& c, int emulated_threads);

// Threads per block of the CUDA kernel.
int block_threads();

}  // namespace topd
