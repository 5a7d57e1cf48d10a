// Internal interface between the CPU dispatcher (dispatch.cpp) and the
// per-instruction-set kernel variants (scalar.cpp, avx2.cpp, avx512.cpp).
#pragma once

#include <cstdint>

#include "lowbit/cpu.h"

// The vector variants are built on x86-64 with GCC or clang, each in its own
// translation unit that switches the target with a pragma (no global -m flags),
// so the library still loads on any x86-64 and picks a variant at run time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_HAVE_AVX2 1
#define LOWBIT_HAVE_AVX512 1
#endif

namespace lowbit {
namespace cpu {

// Activation rows up to which the fp32 GEMV beats decoding to fp32 for the GEMM.
constexpr int64_t kGemvMaxRows = 4;
// Activation rows up to which the integer path is taken (outside exact mode).
constexpr int64_t kQ8MaxRows = 16;
// Activation rows from which the bf16 GEMM is taken where it is enabled
// (outside exact mode); it replaces the integer path from there on. Measured
// on Sapphire Rapids, 4096 x 4096, cold weights: the integer path's cost grows
// with the rows, the AMX kernel's is flat up to 16; they were even at 10 to
// 12 rows (BENCHMARKS.md).
constexpr int64_t kBf16MinRows = 12;

// y[m][n] = sum_k x[m][k] * W[n][k] for fp32 activations x (row stride
// x_stride) into fp32 y (row stride w.n), without bias. Each variant prepares
// the activations in its own layout and splits the work with `par`.
using LinearFn = void (*)(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride,
                          float* y, const Parallel& par);

// Activation rows quantized by quantize_act_group (lowbit/q8.h): m rows of
// w.k int8 codes and w.k / 32 scales, contiguous.
struct Q8Rows {
  const int8_t* q;
  const float* scales;
  int64_t m;
};

// y[m][n] = sum_k d[m][k / 32] * q[m][k] * W[n][k] (row stride w.n), without
// bias: the integer path for a few activation rows.
using LinearQ8Fn = void (*)(const QuantMatrix& w, const Q8Rows& x, float* y, const Parallel& par);

namespace scalar {
void linear(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride, float* y,
            const Parallel& par);
}  // namespace scalar

#if defined(LOWBIT_HAVE_AVX2)
namespace avx2 {
void linear(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride, float* y,
            const Parallel& par);
// The 16-lane (AVX-512) algorithm run on pairs of AVX2 registers: lets CPUs
// without AVX-512 test everything of the AVX-512 variant but its intrinsics.
void linear_emulated16(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride,
                       float* y, const Parallel& par);
// The integer path with vpmaddubsw + vpmaddwd, on 8 lanes and on 16 emulated.
void linear_q8(const QuantMatrix& w, const Q8Rows& x, float* y, const Parallel& par);
void linear_q8_emulated16(const QuantMatrix& w, const Q8Rows& x, float* y, const Parallel& par);
}  // namespace avx2
#endif

#if defined(LOWBIT_HAVE_AVX512)
namespace avx512 {
void linear(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride, float* y,
            const Parallel& par);
}  // namespace avx512
// The integer path with AVX-512 VNNI (vpdpbusd); only for CPUs that have it.
namespace avx512vnni {
void linear_q8(const QuantMatrix& w, const Q8Rows& x, float* y, const Parallel& par);
}  // namespace avx512vnni
// The bf16 GEMM (avx512_bf16.cpp): weights decoded to bf16 panels, x rounded
// to bf16, fp32 accumulation; with AMX tiles (`tiles`: only once Linux granted
// the tile permission) or AVX-512 BF16 dot products. Needs AVX-512 VBMI and BF16.
namespace bf16 {
void linear(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride, float* y, bool tiles,
            const Parallel& par);
}  // namespace bf16
#endif

}  // namespace cpu
}  // namespace lowbit
