// Vec16, the 16-lane AVX-512 vector of the kernel variants in avx512.cpp and
// avx512_vnni.cpp. Included by each inside its own target switch and
// namespace; LOWBIT_VEC16_VNNI adds the VNNI dot product.
// No include guard: each translation unit includes it once, in its namespace.

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
  // The first `count` (< 16) values, the other lanes zero, without reading past them.
  static F load_f16_partial(const uint16_t* p, int count) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1u), p));
  }
  static F load_bf16_partial(const uint16_t* p, int count) {
    const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1u), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load_bf16(const uint16_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }

  // Integer dot products (the int8 GEMV of simd_q8_gemv.h).
  static I zero_i() { return _mm512_setzero_si512(); }
  static I splat_bytes(uint8_t b) { return _mm512_set1_epi8(static_cast<char>(b)); }
  // a | (b & c) in one instruction.
  static I or_and(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0xF8); }
  // Byte b: the low nibble of byte b / 2 of `words` words at p if b is even,
  // its high nibble if odd, in bits 0-3 (bits 4-7: garbage).
  static I expand_nibbles(const uint32_t* p, int words) {
    const __m256i h = _mm256_maskz_loadu_epi32(static_cast<__mmask8>((1u << words) - 1u), p);
    const __m512i x = _mm512_cvtepu8_epi16(h);
    return _mm512_or_si512(x, _mm512_slli_epi16(x, 4));
  }
#if defined(LOWBIT_VEC16_VNNI)
  // acc + the sum of the four products u8 * s8 of each 32-bit lane; the
  // accumulator is already in 32-bit lanes.
  static I dot_add(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static I dot_lanes(I acc) { return acc; }
#endif
};
