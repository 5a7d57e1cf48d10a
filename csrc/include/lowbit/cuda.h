// The torch-free CUDA kernel API: plain device pointers, sizes, strides and a
// stream. The torch binding (csrc/torch/ops_cuda.cpp) is its caller. Launchers
// only enqueue work on `stream`: they never synchronise or allocate, so they
// can be captured in CUDA graphs. They return the launch status; a `bits`
// other than 2, 3 or 4 throws std::invalid_argument before any launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lowbit/cuda_plan.h"
#include "lowbit/half.h"
#include "lowbit/matrix.h"

namespace lowbit {
namespace cuda {

using lowbit::QuantMatrix;  // in device memory

// codes[n, k] (uint8, each < 2^bits) -> packed[n, words_per_row(k, bits)].
cudaError_t pack(const uint8_t* codes, int64_t n, int64_t k, int bits, uint32_t* packed,
                 cudaStream_t stream);
// packed -> codes[n, k].
cudaError_t unpack(const uint32_t* packed, int64_t n, int64_t k, int bits, uint8_t* codes,
                   cudaStream_t stream);
// out[n, k] = scales * (codes - zeros) in `out_dtype`, computed in fp32 exactly
// as the CPU kernel does (bit-identical results). `out` is 16-byte aligned.
cudaError_t dequantize(const QuantMatrix& w, void* out, DType out_dtype, cudaStream_t stream);

// y[m, n] = x[m, k] @ W^T (+ bias[n]) with fp32 accumulation, for fp16 or bf16
// x; y has x's dtype and row stride n.
struct LinearArgs {
  QuantMatrix w;
  const void* x;     // 16-byte aligned, unit column stride
  DType x_dtype;     // kF16 or kBF16
  int64_t m;
  int64_t x_stride;  // elements between rows, a multiple of 8
  const void* bias;  // [n] or null
  DType bias_dtype;
  void* y;
};

// Bytes of fp32 workspace that `linear` needs for this path and problem (0 if none).
int64_t linear_workspace_bytes(LinearPath path, int64_t m, int64_t n, int64_t k, int sm_count);

// Runs kGemv or kGemm (kDequantMatmul belongs to the caller, which has a GEMM
// library). `workspace` holds linear_workspace_bytes(...) bytes; its content
// is overwritten. `sm_count` is the device's multiprocessor count.
cudaError_t linear(LinearPath path, const LinearArgs& args, float* workspace, int sm_count,
                   cudaStream_t stream);

}  // namespace cuda
}  // namespace lowbit
