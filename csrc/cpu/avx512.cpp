// The AVX-512 (F, BW, VL, DQ) kernel variant: the algorithm of simd_linear.h
// over 16-lane vectors. It differs from the 16-lane emulation in avx2.cpp
// (Vec8x2, which the tests run on CPUs without AVX-512) only in the wrappers
// below.
#include "kernels.h"

#if defined(LOWBIT_HAVE_AVX512)

// Everything included before the target switch is compiled for the baseline.
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "lowbit/cpu.h"
#include "lowbit/dispatch.h"
#include "lowbit/format.h"
#include "lowbit/half.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12's intrinsics start some results from a deliberately undefined
// register (_mm512_undefined_ps), which -Wuninitialized reports.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit {
namespace cpu {
namespace avx512 {

#include "vec16.h"

}  // namespace avx512
}  // namespace cpu
}  // namespace lowbit

#define LOWBIT_SIMD_NAMESPACE avx512
#include "simd_linear.h"
#undef LOWBIT_SIMD_NAMESPACE

namespace lowbit {
namespace cpu {
namespace avx512 {

void linear(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride, float* y,
            const Parallel& par) {
  linear_simd<Vec16>(w, x, m, x_stride, y, par);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace lowbit

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#endif  // LOWBIT_HAVE_AVX512
