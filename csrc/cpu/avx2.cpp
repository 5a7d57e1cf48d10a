// The AVX2 (+FMA, F16C) kernel variant: the algorithm of simd_linear.h over
// 8-lane vectors, and over 16-lane vectors emulated with pairs of AVX2
// registers (the AVX-512 variant's logic, testable without AVX-512).
#include "kernels.h"

#if defined(LOWBIT_HAVE_AVX2)

// Everything included before the target switch is compiled for the baseline.
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "lowbit/cpu.h"
#include "lowbit/format.h"
#include "lowbit/half.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace lowbit {
namespace cpu {
namespace avx2 {

// 8 fp32 lanes in one AVX2 register.
struct Vec8 {
  static constexpr int kLanes = 8;
  static constexpr int kGemmRows = 6;  // 6 x 16 micro-tile: 12 accumulators of 16 registers
  using F = __m256;
  using I = __m256i;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static I load_i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I bcast32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(static_cast<int32_t>(v));
  }
  static I bcast64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return _mm256_set1_epi64x(static_cast<long long>(v));
  }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  // Signed conversion: with 8 lanes every masked field is below 2^16.
  static F u32_to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
};

// 16 fp32 lanes as two AVX2 registers (lanes 0-7, 8-15), with the exact
// unsigned conversion that AVX-512 has in one instruction.
struct Vec8x2 {
  static constexpr int kLanes = 16;
  static constexpr int kGemmRows = 12;  // as the AVX-512 variant
  struct F {
    __m256 lo, hi;
  };
  struct I {
    __m256i lo, hi;
  };

  static F zero() { return {Vec8::zero(), Vec8::zero()}; }
  static F set1(float v) { return {Vec8::set1(v), Vec8::set1(v)}; }
  static F load(const float* p) { return {Vec8::load(p), Vec8::load(p + 8)}; }
  static void store(float* p, F v) {
    Vec8::store(p, v.lo);
    Vec8::store(p + 8, v.hi);
  }
  static F add(F a, F b) { return {Vec8::add(a.lo, b.lo), Vec8::add(a.hi, b.hi)}; }
  static F mul(F a, F b) { return {Vec8::mul(a.lo, b.lo), Vec8::mul(a.hi, b.hi)}; }
  static F fmadd(F a, F b, F c) { return {Vec8::fmadd(a.lo, b.lo, c.lo), Vec8::fmadd(a.hi, b.hi, c.hi)}; }
  static float sum(F v) { return Vec8::sum(Vec8::add(v.lo, v.hi)); }
  static I load_i(const int32_t* p) { return {Vec8::load_i(p), Vec8::load_i(p + 8)}; }
  static I bcast32(const uint8_t* p) { return {Vec8::bcast32(p), Vec8::bcast32(p)}; }
  static I bcast64(const uint8_t* p) { return {Vec8::bcast64(p), Vec8::bcast64(p)}; }
  static I and_(I a, I b) { return {Vec8::and_(a.lo, b.lo), Vec8::and_(a.hi, b.hi)}; }
  static F u32_to_float(I v) { return {u32_half(v.lo), u32_half(v.hi)}; }
  static F load_f16(const uint16_t* p) { return {Vec8::load_f16(p), Vec8::load_f16(p + 8)}; }
  static F load_bf16(const uint16_t* p) { return {Vec8::load_bf16(p), Vec8::load_bf16(p + 8)}; }

 private:
  // hi16 * 65536 + lo16: both conversions exact, one rounding in the FMA.
  static __m256 u32_half(__m256i v) {
    const __m256 high = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 16));
    const __m256 low = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)));
    return _mm256_fmadd_ps(high, _mm256_set1_ps(65536.0f), low);
  }
};

}  // namespace avx2
}  // namespace cpu
}  // namespace lowbit

#define LOWBIT_SIMD_NAMESPACE avx2
#include "simd_linear.h"
#undef LOWBIT_SIMD_NAMESPACE

namespace lowbit {
namespace cpu {
namespace avx2 {

void linear(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride, float* y,
            const Parallel& par) {
  linear_simd<Vec8>(w, x, m, x_stride, y, par);
}

void linear_emulated16(const QuantMatrix& w, const float* x, int64_t m, int64_t x_stride,
                       float* y, const Parallel& par) {
  linear_simd<Vec8x2>(w, x, m, x_stride, y, par);
}

}  // namespace avx2
}  // namespace cpu
}  // namespace lowbit

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // LOWBIT_HAVE_AVX2
