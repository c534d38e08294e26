// Plain C++ interface of the row-backward launchers (no CUDA or torch headers): raw addresses as
// integers, sizes and element strides, the CUDA stream as an integer. Implemented in row_backward.cu.
#pragma once

#include <cstdint>
#include <string>

namespace topd {

struct BackwardCall {
    uintptr_t student = 0, teacher = 0, stats = 0, coef = 0, grad_student = 0, grad_teacher = 0;  // 0: none
    int student_dtype = 0, teacher_dtype = 0;     // 0 float32, 1 bfloat16, 2 float16
    int64_t n_rows = 0, vocab_size = 0, s_width = 0, t_width = 0;
    int64_t s_stride = 0, t_stride = 0, gs_stride = 0, gt_stride = 0;   // row strides, in elements
    int64_t stats_s0 = 0, stats_s1 = 1, coef_s0 = 1;                      // in elements
    double temperature = 1.0;
    int divergence = 0;                           // 0 reverse_kl, 1 forward_kl, 2 jsd
    double beta = 0.5;
    int64_t chunk_cols = 0;                       // 0: chosen by the launcher
};

// Checks the call; returns an empty string when valid, else the reason.
std::string validate(const BackwardCall& c);

// Launches the CUDA kernel on `stream` (a cudaStream_t as an integer) of device `device`.
// Throws std::runtime_error on a CUDA error (also when there is no GPU).
void launch_cuda(const BackwardCall& c, uintptr_t stream, int device);

// The same computation on the host (pointers are host memory), through the same __host__ __device__
// code; `emulated_threads` threads of a block are run one after the other.
void run_host(const BackwardCall& c, int emulated_threads);

// Threads per block of the CUDA kernel, and the default columns per work item.
int block_threads();

}  // namespace topd
