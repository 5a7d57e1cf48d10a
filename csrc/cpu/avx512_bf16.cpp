// The bf16 GEMM for kBf16MinRows and more activation rows: weight rows are
// decoded, kPanelRows at a time and kChunkCodes of k at a time, to a bf16
// panel in L1 (per group: (code - zero) * scale in fp32, rounded to nearest
// even), and multiplied with x rounded to bf16, accumulating in fp32, by AMX
// tiles (tdpbf16ps) or, in bf16 mode "avx512", by AVX-512 BF16 dot products
// (vdpbf16ps); docs/KERNELS.md says when each runs.
//
// Operands, in the layouts both instructions take:
//   A = the panel: [kPanelRows][kChunkCodes] bf16 (rows kPanelStride apart),
//       weight rows in natural order, so that a tile row is 32 consecutive
//       codes of one weight row (one group).
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
// Codes of k per decoded chunk of a panel: 32 rows of 512 codes (32 KB) stay in L1.
constexpr int64_t kChunkCodes = 512;
// bf16 values between panel rows: one cache line more than a chunk, so that
// the 16 rows of an A tile do not all fall into one L1 set.
constexpr int64_t kPanelStride = kChunkCodes + 32;
// Activation rows per pass over the weight: their bf16 pairs (k * 256 bytes
// at 128 rows) stay in L2 while every panel reads them; each pass decodes the
// weight again.
constexpr int64_t kRowsPerPass = 128;

#include "simd_util.h"
inline __mmask16 first_lanes16(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }

// --- activations ---------------------------------------------------------------------------

// Rows [0, blocks * 16) of x as B: bf16 pairs, [block][k / 2][16], zero past
// m. On the calling thread: it is small next to the product, and one parallel
// region fewer means one wait fewer for a descheduled thread on a busy machine.
void prepare_x(const float* x, int64_t m, int64_t k, int64_t stride, int64_t blocks, uint32_t* pairs) {
  const int64_t kp = k / 2;
  for (int64_t row = 0; row < blocks * kTileRows; ++row) {
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
}

// --- weights -------------------------------------------------------------------------------

// Decodes one block of 32 codes (one group) of a row to bf16: the codes go to
// the 16-bit lanes of a zmm (a broadcast and one multishift pick each lane's
// field), and one vpermw looks each up in the group's table of the 2^bits
// weights bf16((q - z) * s), which is built once per group.
template <int kBits>
class BlockDecoder {
 public:
  BlockDecoder() {
    alignas(64) int64_t qwords[8];
    alignas(64) uint8_t shift[64];
    for (int lane = 0; lane < 8; ++lane) {
      // lane L: codes 4L .. 4L + 3, from the qword that holds them
      qwords[lane] = (4 * lane * kLowBits) / 64;
      for (int j = 0; j < 4; ++j) {
        const uint8_t offset = uint8_t((kLowBits * (4 * lane + j)) % 64);
        shift[8 * lane + 2 * j] = shift[8 * lane + 2 * j + 1] = offset;
      }
    }
    qword_idx_ = _mm512_load_si512(qwords);
    shift_ = _mm512_load_si512(shift);
    mask_ = _mm512_set1_epi16((1 << kLowBits) - 1);
    iota_ = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }

  // bf16((q - z) * s) for q < 2^bits, in the low 16-bit lanes: the fp32
  // weight of cpu::dequantize and of the reference, rounded to nearest even.
  __m512i table(float s, float z) const {
    const __m256bh w = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_sub_ps(iota_, _mm512_set1_ps(z)), _mm512_set1_ps(s)));
    return _mm512_castsi256_si512(reinterpret_cast<const __m256i&>(w));
  }

  // The 32 weights of codes [c, c + 32) of a packed row with k codes.
  __m512i weights(const uint32_t* row, int64_t k, int64_t c, __m512i table) const {
    const uint32_t* low = row + c * kLowBits / 32;
    __m512i source;
    if (kLowBits == 2) {
      uint64_t word;
      std::memcpy(&word, low, sizeof(word));
      source = _mm512_set1_epi64(static_cast<long long>(word));
    } else {
      source = _mm512_permutexvar_epi64(
          qword_idx_, _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(low))));
    }
    __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(shift_, source), mask_);
    if (kBits == 3) {  // bit 2 of code c + i is bit i of the 1-bit plane's word
      const __mmask32 high = row[high_plane_offset(k) + c / 32];
      codes = _mm512_mask_add_epi16(codes, high, codes, _mm512_set1_epi16(4));
    }
    return _mm512_permutexvar_epi16(codes, table);
  }

 private:
  static constexpr int kLowBits = low_plane_bits(kBits);
  __m512i qword_idx_, shift_, mask_;
  __m512 iota_;
};

// count values of dtype t from src[i0] on, as fp32, 16 at a time.
void load_floats(const void* src, DType t, int64_t i0, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 lanes = first_lanes16(min64(16, count - i));
    __m512 v;
    if (t == DType::kF32) {
      v = _mm512_maskz_loadu_ps(lanes, static_cast<const float*>(src) + i0 + i);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(lanes, static_cast<const uint16_t*>(src) + i0 + i);
      v = t == DType::kF16 ? _mm512_cvtph_ps(h)
                           : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    _mm512_mask_storeu_ps(dst + i, lanes, v);
  }
}

// The scales s and zeros z of a panel's rows as fp32, [kPanelRows][groups]
// each (rows past the end: zero), and the group of each 32 codes of a row.
struct PanelScales {
  int64_t groups;
  Scratch<float> scales, zeros;
  Scratch<int32_t> group_of_block;

  explicit PanelScales(const QuantMatrix& w)
      : groups(w.groups()), scales(kPanelRows * groups), zeros(kPanelRows * groups),
        group_of_block(w.k / 32) {
    for (int64_t b = 0; b < w.k / 32; ++b) group_of_block.get()[b] = static_cast<int32_t>(b * 32 / w.group_size);
  }

  void load(const QuantMatrix& w, int64_t n0) {
    for (int64_t r = 0; r < kPanelRows; ++r) {
      float* s = scales.get() + r * groups;
      float* z = zeros.get() + r * groups;
      if (n0 + r >= w.n) {
        std::memset(s, 0, static_cast<size_t>(groups) * sizeof(float));
        std::memset(z, 0, static_cast<size_t>(groups) * sizeof(float));
        continue;
      }
      load_floats(w.scales, w.scale_dtype, (n0 + r) * groups, groups, s);
      load_floats(w.zeros, w.scale_dtype, (n0 + r) * groups, groups, z);
    }
  }
};

// panel[r][i - c0] = bf16((code - z) * s) of code i of weight row n0 + r,
// for i in [c0, c1) (zero for rows past the end). Rows kPanelStride apart.
template <int kBits>
void decode_panel(const QuantMatrix& w, const BlockDecoder<kBits>& decoder, const PanelScales& ps,
                  int64_t n0, int64_t c0, int64_t c1, uint16_t* panel) {
  const int32_t* group_of_block = ps.group_of_block.get();
  for (int64_t r = 0; r < kPanelRows; ++r) {
    uint16_t* out = panel + r * kPanelStride;
    if (n0 + r >= w.n) {
      std::memset(out, 0, static_cast<size_t>(c1 - c0) * sizeof(uint16_t));
      continue;
    }
    const float* s = ps.scales.get() + r * ps.groups;
    const float* z = ps.zeros.get() + r * ps.groups;
    const uint32_t* row = w.packed + (n0 + r) * w.row_words();
    int32_t group = -1;
    __m512i table = _mm512_setzero_si512();
    for (int64_t c = c0; c < c1; c += 32) {
      if (group_of_block[c / 32] != group) {
        group = group_of_block[c / 32];
        table = decoder.table(s[group], z[group]);
      }
      _mm512_storeu_si512(out + (c - c0), decoder.weights(row, w.k, c, table));
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

// The accumulators of one panel against every activation block of a pass:
// tile(b, a) = C of activation block b and weight rows 16a .. 16a + 15, as
// [16 weight rows][16 activation rows] fp32.
class PanelAccumulators {
 public:
  explicit PanelAccumulators(int64_t blocks) : c_(blocks * 2 * kTileRows * kTileRows) {}
  float* tile(int64_t block, int a) const { return c_.get() + (block * 2 + a) * kTileRows * kTileRows; }

  // Into y (rows m0.., stride w.n), transposed, the valid rows and columns only.
  void store(const QuantMatrix& w, int64_t n0, int64_t m, int64_t blocks, float* y) const {
    for (int64_t b = 0; b < blocks; ++b) {
      for (int a = 0; a < 2; ++a) {
        const float* c = tile(b, a);
        const int64_t first = n0 + a * kTileRows;
        for (int64_t j = 0; j < kTileRows && b * kTileRows + j < m; ++j) {
          for (int64_t i = 0; i < kTileRows && first + i < w.n; ++i) {
            y[(b * kTileRows + j) * w.n + first + i] = c[i * kTileRows + j];
          }
        }
      }
    }
  }

 private:
  Scratch<float> c_;
};

constexpr int64_t kTileStride = kTileRows * sizeof(float);  // bytes per row of a C tile in memory

// C of activation blocks block0 and block0 + 1 += the panel chunk of `width`
// codes times x's pairs of that chunk (x_pairs at pair 0 of the chunk, blocks
// block_pairs apart), with AMX; `first` starts C at zero. Four accumulators
// hide the latency of tdpbf16ps (several times its issue interval).
void tile_product_two_blocks(const uint16_t* panel, int64_t width, const uint32_t* x_pairs,
                             int64_t block_pairs, int64_t block0, bool first, const PanelAccumulators& acc) {
  constexpr int64_t a_stride = kPanelStride * sizeof(uint16_t), b_stride = kTileRows * sizeof(uint32_t);
  const uint32_t* b0 = x_pairs + block0 * block_pairs;
  const uint32_t* b1 = b0 + block_pairs;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, acc.tile(block0, 0), kTileStride);
    _tile_loadd(1, acc.tile(block0 + 1, 0), kTileStride);
    _tile_loadd(2, acc.tile(block0, 1), kTileStride);
    _tile_loadd(3, acc.tile(block0 + 1, 1), kTileStride);
  }
  for (int64_t k0 = 0; k0 < width; k0 += kTileK) {
    const int64_t pair0 = k0 / 2 * kTileRows;
    _tile_loadd(4, panel + k0, a_stride);
    _tile_loadd(5, panel + kTileRows * kPanelStride + k0, a_stride);
    _tile_loadd(6, b0 + pair0, b_stride);
    _tile_loadd(7, b1 + pair0, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, acc.tile(block0, 0), kTileStride);
  _tile_stored(1, acc.tile(block0 + 1, 0), kTileStride);
  _tile_stored(2, acc.tile(block0, 1), kTileStride);
  _tile_stored(3, acc.tile(block0 + 1, 1), kTileStride);
}

// The same for one activation block: even steps of k accumulate in tiles 0
// and 2, odd ones in 1 and 3 (for latency, as above), added at the end.
void tile_product_one_block(const uint16_t* panel, int64_t width, const uint32_t* x_pairs,
                            int64_t block_pairs, int64_t block0, bool first, const PanelAccumulators& acc) {
  constexpr int64_t a_stride = kPanelStride * sizeof(uint16_t), b_stride = kTileRows * sizeof(uint32_t);
  const uint32_t* b0 = x_pairs + block0 * block_pairs;
  if (first) {
    _tile_zero(0);
    _tile_zero(2);
  } else {
    _tile_loadd(0, acc.tile(block0, 0), kTileStride);
    _tile_loadd(2, acc.tile(block0, 1), kTileStride);
  }
  _tile_zero(1);
  _tile_zero(3);
  int64_t k0 = 0;
  for (; k0 + 2 * kTileK <= width; k0 += 2 * kTileK) {
    const int64_t pair0 = k0 / 2 * kTileRows;
    _tile_loadd(4, panel + k0, a_stride);
    _tile_loadd(5, panel + kTileRows * kPanelStride + k0, a_stride);
    _tile_loadd(6, b0 + pair0, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(4, panel + k0 + kTileK, a_stride);
    _tile_loadd(5, panel + kTileRows * kPanelStride + k0 + kTileK, a_stride);
    _tile_loadd(7, b0 + pair0 + kTileK / 2 * kTileRows, b_stride);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
  if (k0 < width) {
    const int64_t pair0 = k0 / 2 * kTileRows;
    _tile_loadd(4, panel + k0, a_stride);
    _tile_loadd(5, panel + kTileRows * kPanelStride + k0, a_stride);
    _tile_loadd(6, b0 + pair0, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
  }
  alignas(64) float odd[2][kTileRows * kTileRows];
  _tile_stored(0, acc.tile(block0, 0), kTileStride);
  _tile_stored(2, acc.tile(block0, 1), kTileStride);
  _tile_stored(1, odd[0], kTileStride);
  _tile_stored(3, odd[1], kTileStride);
  for (int a = 0; a < 2; ++a) {
    float* c = acc.tile(block0, a);
    for (int64_t i = 0; i < kTileRows * kTileRows; i += 16) {
      _mm512_store_ps(c + i, _mm512_add_ps(_mm512_load_ps(c + i), _mm512_load_ps(odd[a] + i)));
    }
  }
}

// The same product with vdpbf16ps: kRows weight rows times kBlocks
// activation blocks of accumulators, each pair of k broadcast from the panel.
template <int kBlocks>
void vector_product(const uint16_t* panel, int64_t width, const uint32_t* x_pairs, int64_t block_pairs,
                    int64_t block0, bool first, const PanelAccumulators& acc) {
  constexpr int kRows = 8;
  const uint32_t* b0 = x_pairs + block0 * block_pairs;
  for (int64_t r0 = 0; r0 < kPanelRows; r0 += kRows) {
    const uint32_t* a = reinterpret_cast<const uint32_t*>(panel + r0 * kPanelStride);
    __m512 sum[kRows][kBlocks];
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = r0 + r;
      for (int b = 0; b < kBlocks; ++b) {
        float* c = acc.tile(block0 + b, static_cast<int>(row / kTileRows)) + row % kTileRows * kTileRows;
        sum[r][b] = first ? _mm512_setzero_ps() : _mm512_load_ps(c);
      }
    }
    for (int64_t p = 0; p < width / 2; ++p) {
      __m512bh xv[kBlocks];
      for (int b = 0; b < kBlocks; ++b) {
        xv[b] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b0 + b * block_pairs + p * kTileRows));
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512bh wv =
            reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r * kPanelStride / 2 + p])));
        for (int b = 0; b < kBlocks; ++b) sum[r][b] = _mm512_dpbf16_ps(sum[r][b], wv, xv[b]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = r0 + r;
      for (int b = 0; b < kBlocks; ++b) {
        _mm512_store_ps(acc.tile(block0 + b, static_cast<int>(row / kTileRows)) + row % kTileRows * kTileRows,
                        sum[r][b]);
      }
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

// C += the chunk's product for every activation block, two blocks at a time.
void chunk_product(const uint16_t* panel, int64_t width, const uint32_t* x_pairs, int64_t block_pairs,
                   int64_t blocks, bool first, bool tiles, const PanelAccumulators& acc) {
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    if (tiles) {
      tile_product_two_blocks(panel, width, x_pairs, block_pairs, b, first, acc);
    } else {
      vector_product<2>(panel, width, x_pairs, block_pairs, b, first, acc);
    }
  }
  if (b < blocks) {
    if (tiles) {
      tile_product_one_block(panel, width, x_pairs, block_pairs, b, first, acc);
    } else {
      vector_product<1>(panel, width, x_pairs, block_pairs, b, first, acc);
    }
  }
}

template <int kBits>
void linear_pass(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, float* y,
                 bool tiles, const Parallel& par) {
  const int64_t k = w.k, blocks = ceil_div(m, kTileRows), block_pairs = k / 2 * kTileRows;
  Scratch<uint32_t> x_pairs(blocks * block_pairs);
  prepare_x(x, m, k, stride, blocks, x_pairs.get());
  static const BlockDecoder<kBits> decoder;
  // Panels are handed out one at a time from a shared counter rather than in
  // fixed ranges, so that a thread that gets less of a busy CPU takes fewer of
  // them; `par` only starts the workers, each of which ignores its range.
  const int64_t panels = ceil_div(w.n, kPanelRows);
  int64_t next_panel = 0;
  for_range(par, panels, 1, [&](int64_t, int64_t) {
    TileScope scope(tiles);
    Scratch<uint16_t> panel(kPanelRows * kPanelStride);
    PanelScales scales(w);
    PanelAccumulators acc(blocks);
    for (int64_t p; (p = __atomic_fetch_add(&next_panel, 1, __ATOMIC_RELAXED)) < panels;) {
      const int64_t n0 = p * kPanelRows;
      scales.load(w, n0);
      // K in chunks: the decoded chunk stays in L1 while every block reads it.
      for (int64_t c0 = 0; c0 < k; c0 += kChunkCodes) {
        const int64_t c1 = min64(k, c0 + kChunkCodes);
        decode_panel<kBits>(w, decoder, scales, n0, c0, c1, panel.get());
        chunk_product(panel.get(), c1 - c0, x_pairs.get() + c0 / 2 * kTileRows, block_pairs, blocks,
                      c0 == 0, tiles, acc);
      }
      acc.store(w, n0, m, blocks, y);
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
