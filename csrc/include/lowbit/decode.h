// Packed codes to pairs of 16-bit floats with integer bit tricks: the decoding
// of the CUDA kernels. It is host code too, so that the C++ tests run exactly
// what the kernels run; on the host the 16-bit arithmetic is emulated.
//
// The trick: a 16-bit float whose exponent makes its last mantissa bit worth 1
// (fp16 0x6400 = 1024, bf16 0x4300 = 128) becomes 2^m + q when an integer
// q < 2^m is OR-ed into its mantissa. One AND-OR (a single LOP3 instruction)
// therefore turns two fields of a packed word, one in each 16-bit half, into
// two floats, and one fused multiply-add removes the bias (and the field's
// position) exactly. No integer-to-float conversion is executed.
#pragma once

#include <cmath>
#include <cstdint>

#include "lowbit/format.h"
#include "lowbit/half.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LOWBIT_UNROLL _Pragma("unroll")
#else
#define LOWBIT_UNROLL
#endif

namespace lowbit {
namespace decode {

// Two 16-bit floats in one 32-bit register, element 0 in the low half: the
// layout of half2/bfloat162 and of the operand registers of mma instructions.
using Pair = uint32_t;

LOWBIT_HD constexpr Pair pair_of(uint16_t lo, uint16_t hi) {
  return uint32_t(lo) | (uint32_t(hi) << 16);
}
LOWBIT_HD constexpr uint16_t low_half(Pair p) { return uint16_t(p & 0xffffu); }
LOWBIT_HD constexpr uint16_t high_half(Pair p) { return uint16_t(p >> 16); }
LOWBIT_HD constexpr Pair splat(uint16_t h) { return pair_of(h, h); }

// Byte i of the result is byte (selector >> 4i) & 7 of the 8 bytes {b, a}
// (a holds bytes 0-3). One PRMT instruction on the GPU.
LOWBIT_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, selector);
#else
  const uint64_t bytes = (uint64_t(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t pick = (selector >> (4 * i)) & 7u;
    r |= uint32_t((bytes >> (8 * pick)) & 0xffu) << (8 * i);
  }
  return r;
#endif
}

// (a & mask) | bits in one LOP3 instruction. Written out because, given two
// immediate constants, the compiler emits an AND and an OR; here they are
// register operands, loaded once outside the loops.
LOWBIT_HD uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));
  return d;
#else
  return (a & mask) | bits;
#endif
}

// (a.lo, b.lo) and (a.hi, b.hi).
LOWBIT_HD uint32_t low_halves(uint32_t a, uint32_t b) { return byte_perm(a, b, 0x5410); }
LOWBIT_HD uint32_t high_halves(uint32_t a, uint32_t b) { return byte_perm(a, b, 0x7632); }

// The two 16-bit float formats: mantissa width, exponent bias, conversions and
// the paired fused multiply-add (one HFMA2 on the GPU). The host emulation
// rounds twice (to fp32, then to 16 bits); the decoding below only relies on
// operations whose exact result is representable, where both agree.
template <class Format>
LOWBIT_HD Pair emulated_fma(Pair a, Pair b, Pair c) {
  auto one = [](uint16_t x, uint16_t y, uint16_t z) {
    return Format::from_float(
        std::fma(Format::to_float(x), Format::to_float(y), Format::to_float(z)));
  };
  return pair_of(one(low_half(a), low_half(b), low_half(c)),
                 one(high_half(a), high_half(b), high_half(c)));
}

struct F16 {
  static constexpr int kMantissaBits = 10;
  static constexpr int kBias = 15;
  static LOWBIT_HD float to_float(uint16_t h) { return fp16_to_float(h); }
  static LOWBIT_HD uint16_t from_float(float f) {
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(f));
#else
    return float_to_fp16(f);
#endif
  }
  static LOWBIT_HD Pair fma(Pair a, Pair b, Pair c) {
#if defined(__CUDA_ARCH__)
    Pair d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
#else
    return emulated_fma<F16>(a, b, c);
#endif
  }
  // (lo, hi) rounded to nearest even, in one instruction on the GPU.
  static LOWBIT_HD Pair from_floats(float lo, float hi) {
#if defined(__CUDA_ARCH__)
    Pair d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return pair_of(from_float(lo), from_float(hi));
#endif
  }
};

struct BF16 {
  static constexpr int kMantissaBits = 7;
  static constexpr int kBias = 127;
  static LOWBIT_HD float to_float(uint16_t h) { return bf16_to_float(h); }
  static LOWBIT_HD uint16_t from_float(float f) {
#if defined(__CUDA_ARCH__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    return float_to_bf16(f);
#endif
  }
  static LOWBIT_HD Pair fma(Pair a, Pair b, Pair c) {
#if defined(__CUDA_ARCH__)
    Pair d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
#else
    return emulated_fma<BF16>(a, b, c);
#endif
  }
  static LOWBIT_HD Pair from_floats(float lo, float hi) {
#if defined(__CUDA_ARCH__)
    Pair d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return pair_of(from_float(lo), from_float(hi));
#endif
  }
};

// 2^e and -2^e (normal numbers only).
template <class Format>
LOWBIT_HD constexpr uint16_t pow2(int e) {
  return uint16_t((Format::kBias + e) << Format::kMantissaBits);
}
template <class Format>
LOWBIT_HD constexpr uint16_t neg_pow2(int e) {
  return uint16_t(0x8000u | pow2<Format>(e));
}

// The right shift that brings a `width`-bit field at bit `pos` of each 16-bit
// half inside a mantissa of `mantissa_bits`: none if it fits where it is, else
// a whole number of bytes when that suffices (so that neighbouring fields share
// one shift), else all the way down to bit 0.
LOWBIT_HD constexpr int field_shift(int mantissa_bits, int width, int pos) {
  return pos + width <= mantissa_bits          ? 0
         : pos % 8 + width <= mantissa_bits    ? pos - pos % 8
                                               : pos;
}

// The `width`-bit fields at bits `pos` and `pos + 16` of `word` as exact
// floats (q_lo, q_hi). In unrolled device code every argument but `word` is a
// constant, and this costs at most a shift, one LOP3 and one HFMA2.
template <class Format>
LOWBIT_HD Pair field_pair(uint32_t word, int width, int pos) {
  const int shift = field_shift(Format::kMantissaBits, width, pos);
  const int at = pos - shift;
  const uint32_t field = ((1u << width) - 1u) << at;
  const uint32_t biased =  // 2^m + q 2^at in each half
      and_or(word >> shift, field | (field << 16), splat(pow2<Format>(Format::kMantissaBits)));
  // (2^m + q 2^at) 2^-at - 2^(m - at) = q: all terms are exact.
  return Format::fma(biased, splat(pow2<Format>(-at)),
                     splat(neg_pow2<Format>(Format::kMantissaBits - at)));
}

// --- one word of a plane -----------------------------------------------------------------
//
// A word of a 2-bit plane holds 16 codes; decoding yields 8 pairs, pair j holding
// codes j and j + 8 (the fields at bits 2j and 2j + 16). A 4-bit word holds 8
// codes: 4 pairs, pair j holding codes j and j + 4.

LOWBIT_HD constexpr int pairs_per_word(int plane_bits) { return 16 / plane_bits; }

template <class Format, int kPlaneBits>
LOWBIT_HD void word_pairs(uint32_t word, Pair* out) {
  LOWBIT_UNROLL
  for (int j = 0; j < pairs_per_word(kPlaneBits); ++j) {
    out[j] = field_pair<Format>(word, kPlaneBits, kPlaneBits * j);
  }
}

// Bit 2 of the codes of low-plane word `half` (0 or 1) of a 3-bit block, taken
// from the block's high-plane word and spread so that bit j holds that of
// code j and bit 16 + j that of code j + 8: the pairing of word_pairs<2>.
LOWBIT_HD uint32_t spread_high_bits(uint32_t high_word, int half) {
  return byte_perm(high_word, 0u, half ? 0x4342u : 0x4140u);
}

// 3-bit codes q = low | high << 2 of one low-plane word, as word_pairs<2> pairs them.
template <class Format>
LOWBIT_HD void word_pairs_3bit(uint32_t low_word, uint32_t spread_high, Pair* out) {
  LOWBIT_UNROLL
  for (int j = 0; j < 8; ++j) {
    const Pair low = field_pair<Format>(low_word, 2, 2 * j);
    const Pair high = field_pair<Format>(spread_high, 1, j);
    out[j] = Format::fma(high, splat(pow2<Format>(2)), low);  // exact: small integers
  }
}

// Scaled weights s q + m, with m = -s z (one HFMA2 per pair).
template <class Format>
LOWBIT_HD Pair scaled(Pair codes, Pair scale, Pair offset) {
  return Format::fma(codes, scale, offset);
}

// --- chunks: the unit of the GEMV kernel ---------------------------------------------------
//
// A chunk is 64 consecutive codes of one row (two 32-code blocks): 16 bytes of
// a 2-bit or 3-bit row's low plane (plus 8 bytes of the 3-bit high plane) or 32
// bytes of a 4-bit row. Its registers hold the low-plane words, then the
// high-plane words. Decoding yields 32 pairs; pair p belongs to block p / 16.

template <int kBits>
struct Chunk {
  static constexpr int kCodes = 64;
  static constexpr int kPlaneBits = kBits == 3 ? 2 : kBits;
  static constexpr int kLowWords = kCodes * kPlaneBits / 32;
  static constexpr int kHighWords = kBits == 3 ? 2 : 0;
  static constexpr int kWords = kLowWords + kHighWords;
  static constexpr int kPairsPerWord = pairs_per_word(kPlaneBits);
  static constexpr int kPairs = kCodes / 2;
  static constexpr int kLowWordsPerBlock = kLowWords / 2;
  // Offsets in a packed row of k codes of the low-plane and high-plane words
  // of the chunk that starts at code `first` (a multiple of 64).
  static LOWBIT_HD constexpr int64_t low_offset(int64_t first) { return first * kPlaneBits / 32; }
  static LOWBIT_HD constexpr int64_t high_offset(int64_t k, int64_t first) {
    return high_plane_offset(k) + first / 32;
  }
};

// Offsets within the chunk of the two codes of pair p.
LOWBIT_HD constexpr int pair_low_code(int bits, int p) {
  return (p / pairs_per_word(low_plane_bits(bits))) * codes_per_word(low_plane_bits(bits)) +
         p % pairs_per_word(low_plane_bits(bits));
}
LOWBIT_HD constexpr int pair_high_code(int bits, int p) {
  return pair_low_code(bits, p) + pairs_per_word(low_plane_bits(bits));
}

// The pairs of low-plane word w of a chunk: pairs w * kPairsPerWord onwards.
template <class Format, int kBits>
LOWBIT_HD void chunk_word_pairs(const uint32_t* words, int w, Pair* out) {
  using C = Chunk<kBits>;
  if constexpr (kBits == 3) {
    const uint32_t high = words[C::kLowWords + w / C::kLowWordsPerBlock];
    word_pairs_3bit<Format>(words[w], spread_high_bits(high, w % C::kLowWordsPerBlock), out);
  } else {
    word_pairs<Format, C::kPlaneBits>(words[w], out);
  }
}

// The activations that pair p of a chunk multiplies, given the chunk's 64
// activations as 32 words of two consecutive 16-bit values.
template <int kBits>
LOWBIT_HD Pair activation_pair(const uint32_t* x_words, int p) {
  const int lo = pair_low_code(kBits, p);
  const int hi = pair_high_code(kBits, p);  // same parity as lo
  return lo % 2 == 0 ? low_halves(x_words[lo / 2], x_words[hi / 2])
                     : high_halves(x_words[lo / 2], x_words[hi / 2]);
}

// --- blocks in natural order: the unit of the GEMM kernel ----------------------------------
//
// One 32-code block (all in one quantization group) as 16 scaled pairs of
// consecutive codes, out[i] = (w[2i], w[2i + 1]), ready for 16-byte stores.
// `low` points at the block's low-plane words; `high` is its high-plane word
// (3-bit only).
template <class Format, int kBits>
LOWBIT_HD void block_pairs_in_order(const uint32_t* low, uint32_t high, Pair scale, Pair offset,
                                    Pair* out) {
  constexpr int kPlaneBits = kBits == 3 ? 2 : kBits;
  constexpr int kPerWord = pairs_per_word(kPlaneBits);
  LOWBIT_UNROLL
  for (int w = 0; w < kPlaneBits; ++w) {  // a block has kPlaneBits low-plane words
    Pair p[kPerWord];
    if constexpr (kBits == 3) {
      word_pairs_3bit<Format>(low[w], spread_high_bits(high, w), p);
    } else {
      word_pairs<Format, kPlaneBits>(low[w], p);
    }
    LOWBIT_UNROLL
    for (int j = 0; j < kPerWord; ++j) p[j] = scaled<Format>(p[j], scale, offset);
    // p[j] holds codes (j, j + kPerWord) of the word: regroup them by neighbours.
    LOWBIT_UNROLL
    for (int i = 0; i < kPerWord / 2; ++i) {
      out[w * kPerWord + i] = low_halves(p[2 * i], p[2 * i + 1]);
      out[w * kPerWord + kPerWord / 2 + i] = high_halves(p[2 * i], p[2 * i + 1]);
    }
  }
}

}  // namespace decode
}  // namespace lowbit
