// The canonical packed layout of lowbit weights (docs/FORMAT.md), as index
// maths shared by the CPU and CUDA builds. Everything here is torch-free and
// usable from host and device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif

namespace lowbit {

// Rows are packed in whole blocks of 32 codes; in_features must be a multiple.
constexpr int kBlockCodes = 32;

LOWBIT_HD constexpr bool is_supported_bits(int bits) {
  return bits == 2 || bits == 3 || bits == 4;
}

// 32-bit words that hold one row of `k` codes: exactly `bits` words per block.
LOWBIT_HD constexpr int64_t words_per_row(int64_t k, int bits) {
  return k / kBlockCodes * bits;
}

// 2- and 4-bit rows are one plane of `bits`-wide fields. 3-bit rows are a
// 2-bit plane (the low two bits of each code, K/16 words) followed by a 1-bit
// plane (bit 2 of each code, K/32 words).
LOWBIT_HD constexpr int low_plane_bits(int bits) { return bits == 3 ? 2 : bits; }

LOWBIT_HD constexpr int codes_per_word(int plane_bits) { return 32 / plane_bits; }

// Offset, in words, of the 1-bit plane of a 3-bit row.
LOWBIT_HD constexpr int64_t high_plane_offset(int64_t k) { return k / 16; }

LOWBIT_HD constexpr uint32_t field_mask(int plane_bits) {
  return (1u << plane_bits) - 1u;
}

// Code `k` of a packed row: sequential little-endian fields within each word.
LOWBIT_HD uint32_t get_code(const uint32_t* row, int64_t row_k, int bits, int64_t k) {
  const int lb = low_plane_bits(bits);
  const int per = codes_per_word(lb);
  uint32_t code = (row[k / per] >> (lb * (k % per))) & field_mask(lb);
  if (bits == 3) {
    code |= ((row[high_plane_offset(row_k) + k / 32] >> (k % 32)) & 1u) << 2;
  }
  return code;
}

// Packs `count` codes (a whole number of words' worth) of width `plane_bits`
// into consecutive words, keeping only the low `plane_bits` of each code.
LOWBIT_HD void pack_plane(const uint8_t* codes, int64_t count, int plane_bits, int shift,
                          uint32_t* out) {
  const int per = codes_per_word(plane_bits);
  const uint32_t mask = field_mask(plane_bits);
  for (int64_t w = 0; w < count / per; ++w) {
    uint32_t word = 0;
    for (int j = 0; j < per; ++j) {
      word |= ((uint32_t(codes[w * per + j]) >> shift) & mask) << (plane_bits * j);
    }
    out[w] = word;
  }
}

// Packs one row of `k` codes (each < 2^bits) into words_per_row(k, bits) words.
LOWBIT_HD void pack_row(const uint8_t* codes, int64_t k, int bits, uint32_t* out) {
  pack_plane(codes, k, low_plane_bits(bits), 0, out);
  if (bits == 3) pack_plane(codes, k, 1, 2, out + high_plane_offset(k));
}

LOWBIT_HD void unpack_row(const uint32_t* row, int64_t k, int bits, uint8_t* codes) {
  for (int64_t i = 0; i < k; ++i) codes[i] = uint8_t(get_code(row, k, bits, i));
}

}  // namespace lowbit
