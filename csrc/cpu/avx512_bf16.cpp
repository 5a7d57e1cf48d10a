// The bf16 GEMM for 16 and more activation rows: weight rows are decoded,
// kPanelRows at a time, to a bf16 panel (per group: scale * code - scale *
// zero, rounded to nearest even) that stays in L2, and multiplied with x
// rounded to bf16, accumulating in fp32, by AMX tiles (tdpbf16ps) or, where
// AMX is absent or refused, by AVX-512 BF16 dot products (vdpbf16ps).
//
// Operands, in the layouts both instructions take:
//   A = the panel: [kPanelRows][k] bf16, weight rows in natural order, so that
//       a tile row is 32 consecutive codes of one weight row (one group).
//   B = x, once per call, in pairs: [m / 16][k / 2][16][2] bf16: element
//       (p, j, t) is x[16 * block + j][2p + t], rows past m are zero. A tile
//       is 16 pairs of k by 16 activation rows; a zmm is one pair for 16 rows.
//   C = A B: [weight row][activation row] fp32, transposed into y when stored.
// The instructions need an ISA beyond the rest of the AVX-512 variant
// (avx512bf16, avx512vbmi, amx-tile, amx-bf16): the dispatcher calls these
// functions only where the CPU has them and, for tiles, where Linux granted
// the tile data permission.
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
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit {
namespace cpu {
namespace bf16 {
namespace {

constexpr int64_t kTileRows = 16;    // rows of every tile; activation rows per block of B
constexpr int64_t kTileK = 32;       // bf16 values of k per tile row (64 bytes)
constexpr int64_t kPanelRows = 32;   // weight rows per panel: two A tiles
constexpr int64_t kCodesPerStep = 64;  // codes decoded per vector step
// Activation rows per pass over the weight: their bf16 pairs (k * 256 bytes
// at 128 rows) stay in L2 while every panel reads them; each pass decodes the
// weight again.
constexpr int64_t kRowsPerPass = 128;

// An aligned buffer (plain malloc: no standard template is instantiated under
// this file's target).
template <class T>
class Scratch {
 public:
  explicit Scratch(int64_t count) {
    const size_t bytes = (static_cast<size_t>(count > 0 ? count : 1) * sizeof(T) + 63) / 64 * 64;
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  ~Scratch() { std::free(data_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return data_; }

 private:
  T* data_;
};

template <class Fn>
void for_range(const Parallel& par, int64_t n, int64_t grain, Fn&& fn) {
  RangeFn range{&fn, [](void* ctx, int64_t b, int64_t e) { (*static_cast<Fn*>(ctx))(b, e); }};
  par.for_range(n, grain, range);
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline __mmask16 first_lanes16(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }

// --- activations ---------------------------------------------------------------------------

// Rows [m0, m0 + blocks * 16) of x as B: bf16 pairs, [block][k / 2][16], zero past m.
void prepare_x(const float* x, int64_t m, int64_t k, int64_t stride, int64_t blocks,
               uint32_t* pairs, const Parallel& par) {
  const int64_t kp = k / 2;
  for_range(par, blocks * kTileRows, 4, [&](int64_t rb, int64_t re) {
    for (int64_t row = rb; row < re; ++row) {
      uint32_t* dst = pairs + (row / kTileRows) * kp * kTileRows + row % kTileRows;
      if (row >= m) {
        for (int64_t p = 0; p < kp; ++p) dst[p * kTileRows] = 0;
        continue;
      }
      const float* src = x + row * stride;
      alignas(64) uint32_t converted[16];
      for (int64_t i = 0; i < k; i += 32) {  // k is a multiple of 32
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
        _mm512_store_si512(converted, reinterpret_cast<const __m512i&>(v));
        for (int j = 0; j < 16; ++j) dst[(i / 2 + j) * kTileRows] = converted[j];
      }
    }
  });
}

// --- weights -------------------------------------------------------------------------------

// The codes of one step (64 codes, or 32 at the end of a row whose k is an odd
// multiple of 32), one per byte.
template <int kBits>
struct CodeBytes {
  static constexpr int kLowBits = low_plane_bits(kBits);
  __m512i low_idx;    // qword lane L holds the source qword of codes 8L .. 8L + 7
  __m512i low_shift;  // byte b of lane L: the bit offset of code 8L + b in that qword
  __m512i low_mask;

  CodeBytes() {
    alignas(64) int64_t idx[8];
    alignas(64) uint8_t shift[64];
    for (int lane = 0; lane < 8; ++lane) {
      idx[lane] = (8 * lane * kLowBits) / 64;
      for (int b = 0; b < 8; ++b) shift[8 * lane + b] = uint8_t((kLowBits * (8 * lane + b)) % 64);
    }
    low_idx = _mm512_load_si512(idx);
    low_shift = _mm512_load_si512(shift);
    low_mask = _mm512_set1_epi8(static_cast<char>((1 << kLowBits) - 1));
  }

  // Codes [c0, c0 + count) of a packed row with k codes, count 32 or 64.
  __m512i operator()(const uint32_t* row, int64_t k, int64_t c0, int64_t count) const {
    const int64_t words = count * kLowBits / 32;
    const __m256i packed = _mm256_maskz_loadu_epi32(static_cast<__mmask8>((1u << words) - 1u),
                                                    row + c0 * kLowBits / 32);
    const __m512i spread = _mm512_permutexvar_epi64(low_idx, _mm512_castsi256_si512(packed));
    __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(low_shift, spread), low_mask);
    if (kBits == 3) {  // bit 2 of code c is bit c of the 1-bit plane
      const uint32_t* high = row + high_plane_offset(k) + c0 / 32;
      uint64_t bits = high[0];
      if (count == 64) bits |= uint64_t(high[1]) << 32;
      codes = _mm512_mask_add_epi8(codes, _cvtu64_mask64(bits), codes, _mm512_set1_epi8(4));
    }
    return codes;
  }
};

// Per group of one row: scale s and offset -s * z, as fp32.
void row_scales(const QuantMatrix& w, int64_t n, float* scales, float* offsets) {
  const int64_t groups = w.groups();
  for (int64_t g = 0; g < groups; ++g) {
    const float s = load_as_float(w.scales, w.scale_dtype, n * groups + g);
    scales[g] = s;
    offsets[g] = -s * load_as_float(w.zeros, w.scale_dtype, n * groups + g);
  }
}

// 32 codes (bytes 32 * H .. 32 * H + 31 of `codes`, one group) times s plus
// offset, rounded to bf16 pairs and stored at out.
template <int H>
void store_scaled_half(__m512i codes, __m512 s, __m512 offset, uint16_t* out) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 2 * H)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 2 * H + 1)));
  const __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, s, offset), _mm512_fmadd_ps(lo, s, offset));
  _mm512_storeu_si512(out, reinterpret_cast<const __m512i&>(pairs));
}

// panel[r][i] = bf16(s * code - s * z) of weight row n0 + r, zero past the last row.
template <int kBits>
void decode_panel(const QuantMatrix& w, const CodeBytes<kBits>& code_bytes, int64_t n0,
                  float* scales, float* offsets, uint16_t* panel) {
  const int64_t k = w.k, g = w.group_size;
  for (int64_t r = 0; r < kPanelRows; ++r) {
    uint16_t* out = panel + r * k;
    if (n0 + r >= w.n) {
      std::memset(out, 0, static_cast<size_t>(k) * sizeof(uint16_t));
      continue;
    }
    row_scales(w, n0 + r, scales, offsets);
    const uint32_t* row = w.packed + (n0 + r) * w.row_words();
    for (int64_t c0 = 0; c0 < k; c0 += kCodesPerStep) {
      const int64_t count = min64(kCodesPerStep, k - c0);
      const __m512i codes = code_bytes(row, k, c0, count);
      // 32 codes lie in one group: group sizes are multiples of 32.
      const int64_t g0 = c0 / g;
      store_scaled_half<0>(codes, _mm512_set1_ps(scales[g0]), _mm512_set1_ps(offsets[g0]), out + c0);
      if (count == kCodesPerStep) {
        const int64_t g1 = (c0 + 32) / g;
        store_scaled_half<1>(codes, _mm512_set1_ps(scales[g1]), _mm512_set1_ps(offsets[g1]), out + c0 + 32);
      }
    }
  }
}

// --- products ------------------------------------------------------------------------------

// The tile palette: every tile 16 rows of 64 bytes. Tiles 0-3 accumulate C
// (weight block a, activation block b at 2a + b), 4-5 hold A, 6-7 hold B.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};

  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      bytes_per_row[t] = kTileK * sizeof(uint16_t);
      rows[t] = kTileRows;
    }
  }
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// Accumulators of one panel and up to two blocks of activation rows, as
// c[a][b] = [16 weight rows][16 activation rows], written into y.
struct PanelOutput {
  alignas(64) float c[2][2][kTileRows][kTileRows];

  void store(const QuantMatrix& w, int64_t n0, int64_t m, int64_t block0, int blocks, float* y) const {
    for (int a = 0; a < 2; ++a) {
      for (int b = 0; b < blocks; ++b) {
        const int64_t m0 = (block0 + b) * kTileRows;
        for (int64_t j = 0; j < kTileRows && m0 + j < m; ++j) {
          for (int64_t i = 0; i < kTileRows && n0 + a * kTileRows + i < w.n; ++i) {
            y[(m0 + j) * w.n + n0 + a * kTileRows + i] = c[a][b][i][j];
          }
        }
      }
    }
  }
};

// C += A B over all of k with AMX, for activation blocks block0 and, if
// kBlocks == 2, block0 + 1.
template <int kBlocks>
void tile_product(const uint16_t* panel, int64_t k, const uint32_t* x_pairs, int64_t block0,
                  PanelOutput& out) {
  const int64_t a_stride = k * sizeof(uint16_t), b_stride = kTileRows * sizeof(uint32_t);
  const int64_t block_pairs = k / 2 * kTileRows;
  const uint32_t* b0 = x_pairs + block0 * block_pairs;
  const uint32_t* b1 = b0 + block_pairs;
  _tile_zero(0);
  _tile_zero(2);
  if (kBlocks == 2) {
    _tile_zero(1);
    _tile_zero(3);
  }
  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
    const int64_t pair0 = k0 / 2 * kTileRows;
    _tile_loadd(4, panel + k0, a_stride);
    _tile_loadd(5, panel + kTileRows * k + k0, a_stride);
    _tile_loadd(6, b0 + pair0, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (kBlocks == 2) {
      _tile_loadd(7, b1 + pair0, b_stride);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int64_t c_stride = kTileRows * sizeof(float);
  _tile_stored(0, out.c[0][0], c_stride);
  _tile_stored(2, out.c[1][0], c_stride);
  if (kBlocks == 2) {
    _tile_stored(1, out.c[0][1], c_stride);
    _tile_stored(3, out.c[1][1], c_stride);
  }
}

// The same product with vdpbf16ps: kRows weight rows times kBlocks
// activation blocks of accumulators, each pair of k broadcast from the panel.
template <int kBlocks>
void vector_product(const uint16_t* panel, int64_t k, const uint32_t* x_pairs, int64_t block0,
                    PanelOutput& out) {
  constexpr int kRows = 8;
  const int64_t kp = k / 2, block_pairs = kp * kTileRows;
  const uint32_t* b0 = x_pairs + block0 * block_pairs;
  for (int64_t r0 = 0; r0 < kPanelRows; r0 += kRows) {
    const uint32_t* a = reinterpret_cast<const uint32_t*>(panel + r0 * k);
    __m512 acc[kRows][kBlocks];
    for (int r = 0; r < kRows; ++r)
      for (int b = 0; b < kBlocks; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kp; ++p) {
      __m512bh xv[kBlocks];
      for (int b = 0; b < kBlocks; ++b) {
        xv[b] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b0 + b * block_pairs + p * kTileRows));
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r * kp + p])));
        for (int b = 0; b < kBlocks; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], wv, xv[b]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = r0 + r;
      for (int b = 0; b < kBlocks; ++b) _mm512_store_ps(out.c[row / kTileRows][b][row % kTileRows], acc[r][b]);
    }
  }
}

// Loads the tile configuration on the calling thread for the lifetime of the
// object and releases the tiles after; nothing when the tiles are not used.
class TileScope {
 public:
  explicit TileScope(bool tiles) : tiles_(tiles) {
    if (tiles_) {
      static const TileConfig config;
      _tile_loadconfig(&config);
    }
  }
  ~TileScope() {
    if (tiles_) _tile_release();
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  bool tiles_;
};

template <int kBits>
void linear_pass(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, float* y,
                 bool tiles, const Parallel& par) {
  const int64_t k = w.k, blocks = ceil_div(m, kTileRows);
  Scratch<uint32_t> x_pairs(blocks * kTileRows * (k / 2));
  prepare_x(x, m, k, stride, blocks, x_pairs.get(), par);
  static const CodeBytes<kBits> code_bytes;
  for_range(par, ceil_div(w.n, kPanelRows), 1, [&](int64_t pb, int64_t pe) {
    TileScope scope(tiles);
    Scratch<uint16_t> panel(kPanelRows * k);
    Scratch<float> scales(w.groups()), offsets(w.groups());
    Scratch<PanelOutput> out(1);
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t n0 = p * kPanelRows;
      decode_panel<kBits>(w, code_bytes, n0, scales.get(), offsets.get(), panel.get());
      int64_t b = 0;
      for (; b + 2 <= blocks; b += 2) {
        if (tiles) {
          tile_product<2>(panel.get(), k, x_pairs.get(), b, *out.get());
        } else {
          vector_product<2>(panel.get(), k, x_pairs.get(), b, *out.get());
        }
        out.get()->store(w, n0, m, b, 2, y);
      }
      if (b < blocks) {
        if (tiles) {
          tile_product<1>(panel.get(), k, x_pairs.get(), b, *out.get());
        } else {
          vector_product<1>(panel.get(), k, x_pairs.get(), b, *out.get());
        }
        out.get()->store(w, n0, m, b, 1, y);
      }
    }
  });
}

}  // namespace

void linear(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, float* y, bool tiles,
            const Parallel& par) {
  if (m == 0 || w.n == 0) return;
  dispatch_bits(w.bits, [&](auto bits) {
    // Passes of kRowsPerPass rows keep x's pairs in L2 while every panel reads them.
    for (int64_t m0 = 0; m0 < m; m0 += kRowsPerPass) {
      linear_pass<decltype(bits)::value>(w, x + m0 * stride, min64(kRowsPerPass, m - m0), stride,
                                         y + m0 * w.n, tiles, par);
    }
  });
}

}  // namespace bf16
}  // namespace cpu
}  // namespace lowbit

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#endif  // LOWBIT_HAVE_AVX512
