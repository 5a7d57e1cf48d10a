// The integer path of the AVX-512 variant: simd_q8_gemv.h over 16-lane
// vectors with VNNI's vpdpbusd. A translation unit of its own because its
// target adds avx512vnni, which the rest of the AVX-512 variant must not
// assume; the dispatcher calls it only on CPUs that have VNNI.
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
#include "lowbit/q8.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit {
namespace cpu {
namespace avx512vnni {

#define LOWBIT_VEC16_VNNI 1
#include "vec16.h"
#undef LOWBIT_VEC16_VNNI

}  // namespace avx512vnni
}  // namespace cpu
}  // namespace lowbit

#define LOWBIT_SIMD_NAMESPACE avx512vnni
#include "simd_linear.h"
#include "simd_q8_gemv.h"
#undef LOWBIT_SIMD_NAMESPACE

namespace lowbit {
namespace cpu {
namespace avx512vnni {

void linear_q8(const QuantMatrix& w, const Q8Rows& x, float* y, const Parallel& par) {
  linear_q8_simd<Vec16>(w, x, y, par);
}

}  // namespace avx512vnni
}  // namespace cpu
}  // namespace lowbit

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#endif  // LOWBIT_HAVE_AVX512
