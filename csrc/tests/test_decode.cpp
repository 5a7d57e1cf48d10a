// The decoding of the CUDA kernels (decode.h), run on the host: every field
// position, every width and both 16-bit formats, against the canonical layout
// of format.h; and the operand layouts, through an emulated warp (mma.m16n8k16
// and ldmatrix as the PTX ISA specifies them), against direct dot products.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "lowbit/cuda_plan.h"
#include "lowbit/decode.h"
#include "lowbit/format.h"

using namespace lowbit;
using decode::Pair;

namespace {

template <class Format>
double value(uint16_t h) {
  return Format::to_float(h);
}

// Units in the last place of a 16-bit float of magnitude |v| (normal range).
template <class Format>
double ulp(double v) {
  const double a = std::fabs(v) < 1e-30 ? 1e-30 : std::fabs(v);
  return std::ldexp(1.0, int(std::floor(std::log2(a))) - Format::kMantissaBits);
}

std::vector<uint32_t> random_row(std::mt19937& rng, int64_t k, int bits, std::vector<uint8_t>* codes) {
  codes->resize(k);
  for (auto& c : *codes) c = uint8_t(rng() % (1u << bits));
  std::vector<uint32_t> row(words_per_row(k, bits));
  pack_row(codes->data(), k, bits, row.data());
  return row;
}

// One 16-bit value per element, random and of either sign, never zero.
template <class Format>
uint16_t random_value(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  float v = 0.0f;
  while (v == 0.0f) v = normal(rng);
  return Format::from_float(v);
}

// D = A B + C for one m16n8k16 tile, from per-lane registers laid out as the
// PTX ISA specifies (cuda_plan.h), accumulated in double.
template <class Format>
void emulated_mma(const Pair a[32][4], const Pair b[32][2], double c[16][8]) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < 4; ++reg) {
      for (int half = 0; half < 2; ++half) {
        const uint16_t v = half ? decode::high_half(a[lane][reg]) : decode::low_half(a[lane][reg]);
        A[cuda::mma_a_row(lane, reg)][cuda::mma_a_k(lane, reg, half)] = value<Format>(v);
      }
    }
    for (int reg = 0; reg < 2; ++reg) {
      for (int half = 0; half < 2; ++half) {
        const uint16_t v = half ? decode::high_half(b[lane][reg]) : decode::low_half(b[lane][reg]);
        B[cuda::mma_b_k(lane, reg, half)][cuda::mma_b_col(lane)] = value<Format>(v);
      }
    }
  }
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 8; ++col) {
      for (int kk = 0; kk < 16; ++kk) c[r][col] += A[r][kk] * B[kk][col];
    }
  }
}

// ldmatrix.x4: lanes 8i..8i+7 address the rows of matrix i; lane l receives
// elements 2(l % 4), 2(l % 4) + 1 of row l / 4 of each matrix.
void emulated_ldmatrix_x4(const uint16_t* const rows[32], Pair out[32][4]) {
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const uint16_t* row = rows[8 * i + lane / 4];
      out[lane][i] = decode::pair_of(row[2 * (lane % 4)], row[2 * (lane % 4) + 1]);
    }
  }
}

}  // namespace

TEST(mma_maps_match_the_ptx_tables) {
  // Lane 5 is groupID 1, threadID_in_group 1.
  CHECK(cuda::mma_a_row(5, 0) == 1 && cuda::mma_a_k(5, 0, 0) == 2 && cuda::mma_a_k(5, 0, 1) == 3);
  CHECK(cuda::mma_a_row(5, 1) == 9 && cuda::mma_a_k(5, 1, 0) == 2);
  CHECK(cuda::mma_a_row(5, 2) == 1 && cuda::mma_a_k(5, 2, 0) == 10);
  CHECK(cuda::mma_a_row(5, 3) == 9 && cuda::mma_a_k(5, 3, 1) == 11);
  CHECK(cuda::mma_b_k(5, 0, 0) == 2 && cuda::mma_b_k(5, 1, 1) == 11 && cuda::mma_b_col(5) == 1);
  CHECK(cuda::mma_c_row(5, 0) == 1 && cuda::mma_c_col(5, 1) == 3 && cuda::mma_c_row(5, 2) == 9);
  // Every element of A, B and C is held by exactly one (lane, register, half).
  int a_seen[16][16] = {}, b_seen[16][8] = {}, c_seen[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < 4; ++reg) {
      for (int h = 0; h < 2; ++h) ++a_seen[cuda::mma_a_row(lane, reg)][cuda::mma_a_k(lane, reg, h)];
      ++c_seen[cuda::mma_c_row(lane, reg)][cuda::mma_c_col(lane, reg)];
    }
    for (int reg = 0; reg < 2; ++reg) {
      for (int h = 0; h < 2; ++h) ++b_seen[cuda::mma_b_k(lane, reg, h)][cuda::mma_b_col(lane)];
    }
  }
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) CHECK(a_seen[r][c] == 1, "A %d %d", r, c);
    for (int c = 0; c < 8; ++c) CHECK(b_seen[r][c] == 1 && c_seen[r][c] == 1, "B/C %d %d", r, c);
  }
}

TEST(byte_perm_selects_bytes) {
  CHECK(decode::byte_perm(0x33221100u, 0x77665544u, 0x5410u) == 0x55441100u);
  CHECK(decode::byte_perm(0x33221100u, 0x77665544u, 0x7632u) == 0x77663322u);
  CHECK(decode::low_halves(0xbbbbaaaau, 0xddddccccu) == 0xccccaaaau);
  CHECK(decode::high_halves(0xbbbbaaaau, 0xddddccccu) == 0xddddbbbbu);
}

TEST(magic_constants_are_the_documented_ones) {
  CHECK(decode::pow2<decode::F16>(decode::F16::kMantissaBits) == 0x6400);  // 1024
  CHECK(decode::pow2<decode::BF16>(decode::BF16::kMantissaBits) == 0x4300);  // 128
  CHECK(value<decode::F16>(decode::neg_pow2<decode::F16>(-3)) == -0.125);
  CHECK(value<decode::BF16>(decode::pow2<decode::BF16>(2)) == 4.0);
}

template <class Format>
void check_every_field_decodes_exactly() {
  std::mt19937 rng(11);
  for (int width : {1, 2, 4}) {
    for (int pos = 0; pos + width <= 16; pos += width) {
      for (int trial = 0; trial < 300; ++trial) {
        const uint32_t word = trial == 0 ? 0u : trial == 1 ? 0xffffffffu : uint32_t(rng());
        const Pair p = decode::field_pair<Format>(word, width, pos);
        const uint32_t mask = (1u << width) - 1u;
        CHECK(value<Format>(decode::low_half(p)) == double((word >> pos) & mask),
              "width %d pos %d word %08x", width, pos, word);
        CHECK(value<Format>(decode::high_half(p)) == double((word >> (pos + 16)) & mask),
              "width %d pos %d word %08x", width, pos, word);
      }
    }
  }
}

TEST(fields_decode_exactly_in_fp16) { check_every_field_decodes_exactly<decode::F16>(); }
TEST(fields_decode_exactly_in_bf16) { check_every_field_decodes_exactly<decode::BF16>(); }

TEST(field_shifts_keep_fields_inside_the_mantissa) {
  for (int mantissa : {7, 10}) {
    for (int width : {1, 2, 4}) {
      for (int pos = 0; pos + width <= 16; pos += width) {
        const int shift = decode::field_shift(mantissa, width, pos);
        CHECK(shift >= 0 && shift <= pos && pos - shift + width <= mantissa, "%d %d %d", mantissa,
              width, pos);
      }
    }
  }
  // Neighbouring fp16 fields share shifts: 2-bit fields need only 0 and 8.
  for (int pos = 0; pos < 16; pos += 2) CHECK(decode::field_shift(10, 2, pos) % 8 == 0);
}

template <class Format, int kBits>
void check_chunk_pairs() {
  using C = decode::Chunk<kBits>;
  std::mt19937 rng(17 + kBits);
  const int64_t k = 320;  // five chunks
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<uint8_t> codes;
    const std::vector<uint32_t> row = random_row(rng, k, kBits, &codes);
    for (int64_t first = 0; first < k; first += C::kCodes) {
      uint32_t words[C::kWords];
      for (int i = 0; i < C::kLowWords; ++i) words[i] = row[C::low_offset(first) + i];
      for (int i = 0; i < C::kHighWords; ++i) words[C::kLowWords + i] = row[C::high_offset(k, first) + i];
      for (int w = 0; w < C::kLowWords; ++w) {
        Pair p[C::kPairsPerWord];
        decode::chunk_word_pairs<Format, kBits>(words, w, p);
        for (int j = 0; j < C::kPairsPerWord; ++j) {
          const int pair = w * C::kPairsPerWord + j;
          const int lo = decode::pair_low_code(kBits, pair), hi = decode::pair_high_code(kBits, pair);
          CHECK(value<Format>(decode::low_half(p[j])) == codes[first + lo], "bits %d pair %d", kBits, pair);
          CHECK(value<Format>(decode::high_half(p[j])) == codes[first + hi], "bits %d pair %d", kBits, pair);
          CHECK(lo / 32 == pair / 16 && hi / 32 == pair / 16, "pair %d leaves its block", pair);
        }
      }
    }
  }
}

TEST(chunk_pairs_hold_the_documented_codes) {
  check_chunk_pairs<decode::F16, 2>();
  check_chunk_pairs<decode::F16, 3>();
  check_chunk_pairs<decode::F16, 4>();
  check_chunk_pairs<decode::BF16, 2>();
  check_chunk_pairs<decode::BF16, 3>();
  check_chunk_pairs<decode::BF16, 4>();
}

TEST(pairs_cover_each_chunk_once) {
  for (int bits : {2, 3, 4}) {
    int seen[64] = {};
    for (int p = 0; p < 32; ++p) {
      ++seen[decode::pair_low_code(bits, p)];
      ++seen[decode::pair_high_code(bits, p)];
    }
    for (int c = 0; c < 64; ++c) CHECK(seen[c] == 1, "bits %d code %d", bits, c);
  }
}

TEST(activation_pairs_follow_the_code_pairs) {
  std::mt19937 rng(5);
  for (int bits : {2, 3, 4}) {
    uint16_t x[64];
    uint32_t words[32];
    for (auto& v : x) v = uint16_t(rng());
    for (int i = 0; i < 32; ++i) words[i] = decode::pair_of(x[2 * i], x[2 * i + 1]);
    for (int p = 0; p < 32; ++p) {
      const Pair got = bits == 2   ? decode::activation_pair<2>(words, p)
                       : bits == 3 ? decode::activation_pair<3>(words, p)
                                   : decode::activation_pair<4>(words, p);
      CHECK(decode::low_half(got) == x[decode::pair_low_code(bits, p)], "bits %d pair %d", bits, p);
      CHECK(decode::high_half(got) == x[decode::pair_high_code(bits, p)], "bits %d pair %d", bits, p);
    }
  }
}

// A 32-code block decoded in natural order and scaled: within one rounding of s q + m.
template <class Format, int kBits>
void check_block_in_order() {
  std::mt19937 rng(23 + kBits);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  const int64_t k = 128;
  for (int trial = 0; trial < 60; ++trial) {
    std::vector<uint8_t> codes;
    const std::vector<uint32_t> row = random_row(rng, k, kBits, &codes);
    const float s = 0.01f + 0.09f * unit(rng), z = unit(rng) * float((1 << kBits) - 1);
    const Pair scale = Format::from_floats(s, s), offset = Format::from_floats(-s * z, -s * z);
    const double s16 = value<Format>(decode::low_half(scale));
    const double m16 = value<Format>(decode::low_half(offset));
    for (int block = 0; block < k / 32; ++block) {
      Pair out[16];
      const uint32_t high = kBits == 3 ? row[high_plane_offset(k) + block] : 0u;
      decode::block_pairs_in_order<Format, kBits>(row.data() + block * low_plane_bits(kBits), high,
                                                  scale, offset, out);
      for (int i = 0; i < 32; ++i) {
        const uint16_t h = i % 2 ? decode::high_half(out[i / 2]) : decode::low_half(out[i / 2]);
        const double exact = codes[32 * block + i] * s16 + m16;
        CHECK(std::fabs(value<Format>(h) - exact) <= ulp<Format>(exact), "bits %d code %d: %g vs %g",
              kBits, i, value<Format>(h), exact);
      }
    }
  }
}

TEST(blocks_decode_in_order_and_scale) {
  check_block_in_order<decode::F16, 2>();
  check_block_in_order<decode::F16, 3>();
  check_block_in_order<decode::F16, 4>();
  check_block_in_order<decode::BF16, 2>();
  check_block_in_order<decode::BF16, 3>();
  check_block_in_order<decode::BF16, 4>();
}

// One warp of the GEMV kernel on one 16-row tile and one span (4 chunks of 64
// codes), with the operand assembly of gemv.cu, through the emulated mma.
template <class Format, int kBits>
void check_gemv_warp() {
  using C = decode::Chunk<kBits>;
  std::mt19937 rng(31 + kBits);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  const int64_t k = 256, group = 32;
  std::vector<std::vector<uint8_t>> codes(16);
  std::vector<std::vector<uint32_t>> rows(16);
  std::vector<float> s(16 * k / group), z(16 * k / group);
  for (int r = 0; r < 16; ++r) rows[r] = random_row(rng, k, kBits, &codes[r]);
  for (size_t i = 0; i < s.size(); ++i) s[i] = 0.01f + 0.09f * unit(rng), z[i] = unit(rng) * 3;
  uint16_t x[8][256];
  for (auto& col : x) for (auto& v : col) v = random_value<Format>(rng);

  double got[16][8] = {};
  for (int wi = 0; wi < C::kLowWords; ++wi) {
    for (int j = 0; j < C::kPairsPerWord; j += 2) {
      Pair a[32][4], b[32][2];
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        const int64_t first = C::kCodes * t;
        const int block = wi / C::kLowWordsPerBlock;
        Pair q[2][C::kPairsPerWord];
        for (int h = 0; h < 2; ++h) {
          const int r = g + 8 * h;
          uint32_t words[C::kWords];
          for (int i = 0; i < C::kLowWords; ++i) words[i] = rows[r][C::low_offset(first) + i];
          for (int i = 0; i < C::kHighWords; ++i) words[C::kLowWords + i] = rows[r][C::high_offset(k, first) + i];
          const int gi = r * int(k / group) + int((first + 32 * block) / group);
          const Pair scale = Format::from_floats(s[gi], s[gi]);
          const Pair offset = Format::from_floats(-s[gi] * z[gi], -s[gi] * z[gi]);
          decode::chunk_word_pairs<Format, kBits>(words, wi, q[h]);
          for (auto& v : q[h]) v = decode::scaled<Format>(v, scale, offset);
        }
        uint32_t x_words[32];
        for (int i = 0; i < 32; ++i) x_words[i] = decode::pair_of(x[g][first + 2 * i], x[g][first + 2 * i + 1]);
        const int pair = wi * C::kPairsPerWord + j;
        a[lane][0] = q[0][j], a[lane][1] = q[1][j], a[lane][2] = q[0][j + 1], a[lane][3] = q[1][j + 1];
        b[lane][0] = decode::activation_pair<kBits>(x_words, pair);
        b[lane][1] = decode::activation_pair<kBits>(x_words, pair + 1);
      }
      emulated_mma<Format>(a, b, got);
    }
  }
  // The reference rounds each weight to the 16-bit format independently of decode.h.
  double err = 0, norm = 0;
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 8; ++col) {
      double ref = 0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const int gi = r * int(k / group) + int(kk / group);
        const double w = s[gi] * (double(codes[r][kk]) - z[gi]);
        ref += w * value<Format>(x[col][kk]);
      }
      err += (got[r][col] - ref) * (got[r][col] - ref);
      norm += ref * ref;
    }
  }
  const double tolerance = Format::kMantissaBits == 10 ? 2e-3 : 1.5e-2;
  CHECK(std::sqrt(err / norm) < tolerance, "bits %d relative error %g", kBits, std::sqrt(err / norm));
}

TEST(gemv_warp_operands_compute_the_dot_products) {
  check_gemv_warp<decode::F16, 2>();
  check_gemv_warp<decode::F16, 3>();
  check_gemv_warp<decode::F16, 4>();
  check_gemv_warp<decode::BF16, 2>();
  check_gemv_warp<decode::BF16, 3>();
  check_gemv_warp<decode::BF16, 4>();
}

// One GEMM step of a whole block: the packed words gathered as load_step does,
// dequantized by the 256 threads into the swizzled tile, then each warp's
// ldmatrix + mma, against the product of the same 16-bit values.
template <class Format, int kBits>
void check_gemm_step() {
  std::mt19937 rng(41 + kBits);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  const int64_t k = 192, k0 = 64;  // the second of three steps
  const int row_words = cuda::gemm_row_words(kBits);
  std::vector<std::vector<uint8_t>> codes(cuda::kGemmBN);
  std::vector<uint32_t> packed_tile(cuda::kGemmBN * row_words);
  for (int r = 0; r < cuda::kGemmBN; ++r) {
    const std::vector<uint32_t> row = random_row(rng, k, kBits, &codes[r]);
    for (int j = 0; j < row_words; ++j) packed_tile[r * row_words + j] = row[cuda::gemm_word_offset(kBits, k, k0, j)];
  }
  std::vector<uint16_t> x_tile(cuda::kGemmBM * 64), w_tile(cuda::kGemmBN * 64);
  std::vector<double> x_values(cuda::kGemmBM * 64);
  for (int r = 0; r < cuda::kGemmBM; ++r) {
    for (int c = 0; c < 64; ++c) {
      const uint16_t v = random_value<Format>(rng);
      x_tile[cuda::swizzled_offset(r, c / 8) + c % 8] = v;
      x_values[r * 64 + c] = value<Format>(v);
    }
  }
  std::vector<double> w_values(cuda::kGemmBN * 64);
  for (int tid = 0; tid < cuda::kGemmThreads; ++tid) {
    const int r = tid / 2, block = tid % 2;
    const float s = 0.01f + 0.09f * unit(rng), z = unit(rng) * float((1 << kBits) - 1);
    const Pair scale = Format::from_floats(s, s), offset = Format::from_floats(-s * z, -s * z);
    const uint32_t* words = packed_tile.data() + r * row_words;
    const uint32_t high = kBits == 3 ? words[cuda::gemm_low_words(kBits) + block] : 0u;
    Pair out[16];
    decode::block_pairs_in_order<Format, kBits>(words + block * low_plane_bits(kBits), high, scale,
                                                offset, out);
    for (int i = 0; i < 4; ++i) {
      for (int e = 0; e < 8; ++e) {
        const Pair p = out[4 * i + e / 2];
        w_tile[cuda::swizzled_offset(r, 4 * block + i) + e] = e % 2 ? decode::high_half(p) : decode::low_half(p);
      }
    }
    for (int c = 0; c < 32; ++c) {  // independent of decode.h: the format's rounding of s q + m
      const double s16 = value<Format>(decode::low_half(scale));
      const double m16 = value<Format>(decode::low_half(offset));
      w_values[r * 64 + 32 * block + c] =
          value<Format>(Format::from_float(float(codes[r][k0 + 32 * block + c] * s16 + m16)));
    }
  }
  for (int warp = 0; warp < 8; ++warp) {
    const int warp_m = warp / 4, warp_n = warp % 4;
    double got[2][4][16][8] = {};
    for (int kk = 0; kk < 4; ++kk) {
      Pair a[2][32][4], bq[2][32][4];
      for (int mi = 0; mi < 2; ++mi) {
        const uint16_t* rows[32];
        for (int lane = 0; lane < 32; ++lane) {
          rows[lane] = x_tile.data() + cuda::swizzled_offset(32 * warp_m + 16 * mi + cuda::ldsm_a_row(lane),
                                                             2 * kk + cuda::ldsm_a_chunk(lane));
        }
        emulated_ldmatrix_x4(rows, a[mi]);
      }
      for (int nj = 0; nj < 2; ++nj) {
        const uint16_t* rows[32];
        for (int lane = 0; lane < 32; ++lane) {
          rows[lane] = w_tile.data() + cuda::swizzled_offset(32 * warp_n + 16 * nj + cuda::ldsm_b_row(lane),
                                                             2 * kk + cuda::ldsm_b_chunk(lane));
        }
        emulated_ldmatrix_x4(rows, bq[nj]);
      }
      for (int mi = 0; mi < 2; ++mi) {
        for (int ni = 0; ni < 4; ++ni) {
          Pair b[32][2];
          for (int lane = 0; lane < 32; ++lane) {
            b[lane][0] = bq[ni / 2][lane][2 * (ni % 2)];
            b[lane][1] = bq[ni / 2][lane][2 * (ni % 2) + 1];
          }
          emulated_mma<Format>(a[mi], b, got[mi][ni]);
        }
      }
    }
    for (int mi = 0; mi < 2; ++mi) {
      for (int ni = 0; ni < 4; ++ni) {
        for (int r = 0; r < 16; ++r) {
          for (int c = 0; c < 8; ++c) {
            const int xr = 32 * warp_m + 16 * mi + r, wr = 32 * warp_n + 8 * ni + c;
            double ref = 0, scale = 0;
            for (int kk = 0; kk < 64; ++kk) {
              ref += x_values[xr * 64 + kk] * w_values[wr * 64 + kk];
              scale += std::fabs(x_values[xr * 64 + kk] * w_values[wr * 64 + kk]);
            }
            CHECK(std::fabs(got[mi][ni][r][c] - ref) <= 1e-9 * scale + 1e-12,
                  "bits %d warp %d x row %d weight row %d: %g vs %g", kBits, warp, xr, wr,
                  got[mi][ni][r][c], ref);
          }
        }
      }
    }
  }
}

TEST(gemm_step_through_shared_memory_computes_the_product) {
  check_gemm_step<decode::F16, 2>();
  check_gemm_step<decode::F16, 3>();
  check_gemm_step<decode::F16, 4>();
  check_gemm_step<decode::BF16, 2>();
  check_gemm_step<decode::BF16, 3>();
  check_gemm_step<decode::BF16, 4>();
}

TEST(gemm_words_come_from_the_right_blocks) {
  std::mt19937 rng(3);
  for (int bits : {2, 3, 4}) {
    const int64_t k = 320;
    std::vector<uint8_t> codes;
    const std::vector<uint32_t> row = random_row(rng, k, bits, &codes);
    for (int64_t k0 = 0; k0 < k; k0 += cuda::kGemmBK) {
      // Re-pack each block's codes: the words gathered for the step must be those.
      for (int j = 0; j < cuda::gemm_row_words(bits); ++j) {
        const int block = cuda::gemm_word_block(bits, j);
        if (k0 + 32 * block >= k) continue;
        std::vector<uint32_t> one(words_per_row(32, bits));
        pack_row(codes.data() + k0 + 32 * block, 32, bits, one.data());
        const bool low = j < cuda::gemm_low_words(bits);
        const uint32_t expected = low ? one[j % low_plane_bits(bits)] : one[low_plane_bits(bits)];
        CHECK(row[cuda::gemm_word_offset(bits, k, k0, j)] == expected, "bits %d k0 %ld word %d", bits,
              long(k0), j);
      }
    }
  }
}

TEST_MAIN()
