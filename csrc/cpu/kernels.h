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

// y[m][n] = sum_k x[m][k] * W[n][k] for fp32 activations x (row stride
// x_stride) into fp32 y (row stride w.n), without bias. Each variant prepares
// the activations in its own layout and splits the work with `par`.
using LinearFn = void (*)(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride,
                          float* y, const Parallel& par);

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
}  // namespace avx2
#endif

#if defined(LOWBIT_HAVE_AVX512)
namespace avx512 {
void linear(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride, float* y,
            const Parallel& par);
}  // namespace avx512
#endif

}  // namespace cpu
}  // namespace lowbit
