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

// 16 fp32 lanes in one AVX-512 register.
struct Vec16 {
  static constexpr int kLanes = 16;
  static constexpr int kGemmRows = 12;  // 12 x 32 micro-tile: 24 accumulators of 32 registers
  using F = __m512;
  using I = __m512i;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  static I load_i(const void* p) { return _mm512_loadu_si512(p); }
  static I load_i_partial(const void* p, int count) {
    return _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << count) - 1u), p);
  }
  static I srli16(I v) { return _mm512_srli_epi32(v, 16); }
  static I srli(I v, int n) { return _mm512_srli_epi32(v, static_cast<unsigned>(n)); }
  static I slli(I v, int n) { return _mm512_slli_epi32(v, static_cast<unsigned>(n)); }
  // Lane l: the 16 bits of lane l / 2 starting at bit 16 * (l % 2).
  static I spread_pairs(I v) {
    const __m512i idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i shifts = _mm512_setr_epi32(0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16);
    return _mm512_srlv_epi32(_mm512_permutexvar_epi32(idx, v), shifts);
  }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static F permute(F v, I idx) { return _mm512_permutexvar_ps(idx, v); }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load_bf16(const uint16_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
};

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
