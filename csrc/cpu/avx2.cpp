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
#include "lowbit/dispatch.h"
#include "lowbit/format.h"
#include "lowbit/half.h"
#include "lowbit/q8.h"

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
  struct Halves {
    alignas(16) uint16_t v[8];
  };
  static Halves padded(const uint16_t* p, int count) {
    Halves h = {};
    for (int i = 0; i < count; ++i) h.v[i] = p[i];
    return h;
  }

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
  static I load_i(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static I load_i_partial(const void* p, int count) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes);
    return _mm256_maskload_epi32(static_cast<const int*>(p), mask);
  }
  static I srli16(I v) { return _mm256_srli_epi32(v, 16); }
  static I srli(I v, int n) { return _mm256_srli_epi32(v, n); }
  static I slli(I v, int n) { return _mm256_slli_epi32(v, n); }
  // Lane l: the 16 bits of lane first + l / 2 starting at bit 16 * (l % 2).
  static I spread_pairs(I v, int first = 0) {
    const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), _mm256_set1_epi32(first));
    return _mm256_srlv_epi32(_mm256_permutevar8x32_epi32(v, idx),
                             _mm256_setr_epi32(0, 16, 0, 16, 0, 16, 0, 16));
  }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F permute(F v, I idx) { return _mm256_permutevar8x32_ps(v, idx); }
  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }

  // The first `count` (< 8) values, the other lanes zero, without reading past
  // them (AVX2 has no 16-bit masked load: through a zero-padded copy).
  static F load_f16_partial(const uint16_t* p, int count) { return load_f16(padded(p, count).v); }
  static F load_bf16_partial(const uint16_t* p, int count) { return load_bf16(padded(p, count).v); }

  // Integer dot products (the int8 GEMV of simd_q8_gemv.h).
  static I zero_i() { return _mm256_setzero_si256(); }
  static I splat_bytes(uint8_t b) { return _mm256_set1_epi8(static_cast<char>(b)); }
  static I or_and(I a, I b, I c) { return _mm256_or_si256(a, _mm256_and_si256(b, c)); }
  // Products u8 * s8 summed in pairs into 16-bit lanes (vpmaddubsw) over a
  // super-block, then into 32-bit lanes once (vpmaddwd). No 16-bit sum can
  // overflow: a super-block adds at most 4 pairs of codes below 8, or 2 pairs
  // below 16, times |x| <= 127 (at most 7620).
  static I dot_add(I acc, I u, I s) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s)); }
  static I dot_lanes(I acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
  // Byte b: the low nibble of byte b / 2 of `words` (<= 4) words at p if b is
  // even, its high nibble if odd, in bits 0-3 (bits 4-7: garbage).
  static I expand_nibbles(const uint32_t* p, int words) {
    const __m128i mask = _mm_cmpgt_epi32(_mm_set1_epi32(words), _mm_setr_epi32(0, 1, 2, 3));
    const __m256i x = _mm256_cvtepu8_epi16(_mm_maskload_epi32(reinterpret_cast<const int*>(p), mask));
    return _mm256_or_si256(x, _mm256_slli_epi16(x, 4));
  }
};

// 16 fp32 lanes as two AVX2 registers (lanes 0-7, 8-15), for testing the
// 16-lane algorithm of the AVX-512 variant on CPUs without AVX-512.
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
  static I load_i(const void* p) {
    return {Vec8::load_i(p), Vec8::load_i(static_cast<const int32_t*>(p) + 8)};
  }
  static I load_i_partial(const void* p, int count) {
    const int32_t* w = static_cast<const int32_t*>(p);
    return {Vec8::load_i_partial(w, count < 8 ? count : 8),
            count > 8 ? Vec8::load_i_partial(w + 8, count - 8) : _mm256_setzero_si256()};
  }
  static I srli16(I v) { return {Vec8::srli16(v.lo), Vec8::srli16(v.hi)}; }
  static I srli(I v, int n) { return {Vec8::srli(v.lo, n), Vec8::srli(v.hi, n)}; }
  static I slli(I v, int n) { return {Vec8::slli(v.lo, n), Vec8::slli(v.hi, n)}; }
  static I spread_pairs(I v) { return {Vec8::spread_pairs(v.lo, 0), Vec8::spread_pairs(v.lo, 4)}; }
  static I and_(I a, I b) { return {Vec8::and_(a.lo, b.lo), Vec8::and_(a.hi, b.hi)}; }
  static I or_(I a, I b) { return {Vec8::or_(a.lo, b.lo), Vec8::or_(a.hi, b.hi)}; }
  static F to_float(I v) { return {Vec8::to_float(v.lo), Vec8::to_float(v.hi)}; }
  static F permute(F v, I idx) { return {permute_half(v, idx.lo), permute_half(v, idx.hi)}; }
  static F load_f16(const uint16_t* p) { return {Vec8::load_f16(p), Vec8::load_f16(p + 8)}; }
  static F load_bf16(const uint16_t* p) { return {Vec8::load_bf16(p), Vec8::load_bf16(p + 8)}; }
  static F load_f16_partial(const uint16_t* p, int count) {
    return count <= 8 ? F{Vec8::load_f16_partial(p, count), Vec8::zero()}
                      : F{Vec8::load_f16(p), Vec8::load_f16_partial(p + 8, count - 8)};
  }
  static F load_bf16_partial(const uint16_t* p, int count) {
    return count <= 8 ? F{Vec8::load_bf16_partial(p, count), Vec8::zero()}
                      : F{Vec8::load_bf16(p), Vec8::load_bf16_partial(p + 8, count - 8)};
  }
  static I zero_i() { return {Vec8::zero_i(), Vec8::zero_i()}; }
  static I splat_bytes(uint8_t b) { return {Vec8::splat_bytes(b), Vec8::splat_bytes(b)}; }
  static I or_and(I a, I b, I c) { return {Vec8::or_and(a.lo, b.lo, c.lo), Vec8::or_and(a.hi, b.hi, c.hi)}; }
  static I dot_add(I acc, I u, I s) { return {Vec8::dot_add(acc.lo, u.lo, s.lo), Vec8::dot_add(acc.hi, u.hi, s.hi)}; }
  static I dot_lanes(I acc) { return {Vec8::dot_lanes(acc.lo), Vec8::dot_lanes(acc.hi)}; }
  static I expand_nibbles(const uint32_t* p, int words) {
    return {Vec8::expand_nibbles(p, words < 4 ? words : 4),
            words > 4 ? Vec8::expand_nibbles(p + 4, words - 4) : _mm256_setzero_si256()};
  }

 private:
  // Eight lanes picked from all sixteen: from v.lo where idx < 8, else v.hi.
  static __m256 permute_half(F v, __m256i idx) {
    const __m256i in_hi = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7));
    const __m256 from_lo = _mm256_permutevar8x32_ps(v.lo, idx);
    const __m256 from_hi = _mm256_permutevar8x32_ps(v.hi, idx);
    return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(in_hi));
  }
};

}  // namespace avx2
}  // namespace cpu
}  // namespace lowbit

#define LOWBIT_SIMD_NAMESPACE avx2
#include "simd_linear.h"
#include "simd_q8_gemv.h"
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

void linear_q8(const QuantMatrix& w, const Q8Rows& x, float* y, const Parallel& par) {
  linear_q8_simd<Vec8>(w, x, y, par);
}

void linear_q8_emulated16(const QuantMatrix& w, const Q8Rows& x, float* y, const Parallel& par) {
  linear_q8_simd<Vec8x2>(w, x, y, par);
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
