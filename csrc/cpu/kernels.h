// Internal interface between the CPU dispatcher (dispatch.cpp) and the
// per-instruction-set kernel variants (scalar.cpp, avx2.cpp, avx512.cpp).
#pragma once

#include <cstdint>

#include "lowbit/cpu.h"

namespace lowbit {
namespace cpu {

// Activations converted once per call: x[m][k] in fp32 (row stride k) and the
// sum of each quantization group, xsum[m][groups], so that the zero point
// costs one multiply-add per group instead of one per weight:
//   y[m][n] = sum_g s[n][g] * dot(q[n][g], x[m][g]) - s[n][g] * z[n][g] * xsum[m][g]
struct PreparedX {
  const float* x;
  const float* xsum;
  int64_t m;
};

// Computes y[m][n] (fp32, row stride w.n) for the weight rows n in [n0, n1).
using LinearRowsFn = void (*)(const QuantMatrix& w, const PreparedX& x, int64_t n0, int64_t n1,
                              float* y);

// Rows of W that one task of linear() computes; variants may tile within it.
constexpr int64_t kRowsPerTask = 16;

namespace scalar {
void linear_rows(const QuantMatrix& w, const PreparedX& x, int64_t n0, int64_t n1, float* y);
}  // namespace scalar

#if defined(LOWBIT_HAVE_AVX2)
namespace avx2 {
void linear_rows(const QuantMatrix& w, const PreparedX& x, int64_t n0, int64_t n1, float* y);
}  // namespace avx2
#endif

#if defined(LOWBIT_HAVE_AVX512)
namespace avx512 {
void linear_rows(const QuantMatrix& w, const PreparedX& x, int64_t n0, int64_t n1, float* y);
}  // namespace avx512
#endif

}  // namespace cpu
}  // namespace lowbit
