// Host-side decisions of the CUDA kernels, torch-free and GPU-free so that the
// C++ tests check them: which kernel `linear` runs, how work is split over the
// grid, and the thread-to-data maps of the tensor-core instructions.
#pragma once

#include <cstdint>

#include "lowbit/format.h"
#include "lowbit/half.h"

namespace lowbit {
namespace cuda {

LOWBIT_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
LOWBIT_HD constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
LOWBIT_HD constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// n / d for 0 <= n < 2^31 and d >= 1 with a multiply-high, an add and a shift:
// the kernels divide code offsets by group sizes this way.
struct FastDiv {
  uint32_t mul;
  uint32_t shift;
};

LOWBIT_HD constexpr FastDiv make_fast_div(uint32_t d) {
  uint32_t shift = 0;
  while ((uint64_t(1) << shift) < d) ++shift;
  const uint64_t mul = ((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1;
  return FastDiv{uint32_t(mul), shift};
}

LOWBIT_HD uint32_t fast_div(uint32_t n, FastDiv f) {
#if defined(__CUDA_ARCH__)
  const uint32_t high = __umulhi(n, f.mul);
#else
  const uint32_t high = uint32_t((uint64_t(n) * f.mul) >> 32);
#endif
  return (high + n) >> f.shift;
}

// --- which kernel ---------------------------------------------------------------------------

enum class LinearPath : int32_t {
  kAuto = -1,          // chosen by choose_linear_path
  kGemv = 0,           // fused dequantize-GEMV on tensor cores, x rows <= kGemvMaxM
  kGemm = 1,           // fused GEMM: tiles dequantized into shared memory, tensor cores
  kDequantMatmul = 2,  // dequantize the whole weight, then cuBLAS (in the torch binding)
};

// The GEMV kernel keeps x's rows in mma operand columns: two n8 tiles.
constexpr int64_t kGemvMaxM = 16;
// Above this many rows a fused kernel would lose to cuBLAS on the dequantized
// weight, whose one-off dequantization is then cheap next to the GEMM. An
// estimate until measured: bench/gpu/bench_linear.py times every path at every M.
constexpr int64_t kGemmMaxM = 256;

// The kernel `linear` runs for `m` rows of x. fp32 activations always take
// kDequantMatmul (fp32 weights, fp32 cuBLAS); the fused kernels compute in the
// activations' 16-bit format.
LOWBIT_HD constexpr LinearPath choose_linear_path(int64_t m, DType x_dtype) {
  return x_dtype == DType::kF32 ? LinearPath::kDequantMatmul
         : m <= kGemvMaxM       ? LinearPath::kGemv
         : m <= kGemmMaxM       ? LinearPath::kGemm
                                : LinearPath::kDequantMatmul;
}

// Whether `path` can compute `m` rows of `x_dtype` activations.
LOWBIT_HD constexpr bool path_supports(LinearPath path, int64_t m, DType x_dtype) {
  return path == LinearPath::kDequantMatmul ||
         (x_dtype != DType::kF32 && (path == LinearPath::kGemm || m <= kGemvMaxM));
}

inline const char* linear_path_name(LinearPath path) {
  switch (path) {
    case LinearPath::kGemv: return "gemv";
    case LinearPath::kGemm: return "gemm";
    case LinearPath::kDequantMatmul: return "dequant_matmul";
    default: return "auto";
  }
}

// Parses a name of linear_path_name; returns false for anything else.
inline bool parse_linear_path(const char* name, LinearPath* out) {
  for (LinearPath p : {LinearPath::kAuto, LinearPath::kGemv, LinearPath::kGemm,
                       LinearPath::kDequantMatmul}) {
    const char* expected = linear_path_name(p);
    int i = 0;
    while (name[i] != '\0' && name[i] == expected[i]) ++i;
    if (name[i] == '\0' && expected[i] == '\0') {
      *out = p;
      return true;
    }
  }
  return false;
}

// --- GEMV: small M --------------------------------------------------------------------------
//
// A warp computes 32 weight rows (two m16 tiles; each lane holds rows g and
// g + 8 of each, g = lane / 4) over a K range, span by span. A span is 256
// codes: each of the 4 lanes of a quad (t = lane % 4) decodes its own 64-code
// chunk, loaded with one 16-byte access per row (two for 4-bit). The mma's k
// slots of lane t are mapped onto the codes of t's chunk, in the same order for
// weights and activations, so no data moves between lanes. A block's warps
// share its 32 rows and take spans in turn; their partial sums meet in shared
// memory. When the rows alone cannot fill the GPU, K is also split across
// blocks (grid.y), and a second kernel adds the splits.

constexpr int kGemvRowsPerBlock = 32;
constexpr int kGemvSpanCodes = 256;
constexpr int kGemvMaxWarps = 8;
constexpr int kMaxSplits = 16;

struct GemvPlan {
  int64_t row_blocks;       // grid.x: blocks of 32 rows
  int64_t spans;            // spans covering K; the last may be partial
  int64_t spans_per_split;  // spans of one grid.y index
  int splits;               // grid.y; > 1 needs a workspace and a reduction
  int warps;                // warps per block
};

LOWBIT_HD constexpr GemvPlan plan_gemv(int64_t n, int64_t k, int sm_count) {
  GemvPlan p{};
  p.row_blocks = ceil_div(n, kGemvRowsPerBlock);
  p.spans = ceil_div(k, kGemvSpanCodes);
  const int64_t full_warps = min64(kGemvMaxWarps, p.spans);
  // Fewer row blocks than multiprocessors: split K for about two blocks per
  // multiprocessor, while every warp of a split keeps at least one span.
  const int64_t wanted =
      p.row_blocks >= sm_count ? 1 : ceil_div(2 * int64_t(sm_count), p.row_blocks);
  const int64_t most = max64(1, min64(kMaxSplits, p.spans / full_warps));
  const int64_t splits = max64(1, min64(wanted, most));
  p.spans_per_split = ceil_div(p.spans, splits);
  p.splits = int(ceil_div(p.spans, p.spans_per_split));  // no empty split
  p.warps = int(min64(kGemvMaxWarps, p.spans_per_split));
  return p;
}

// --- GEMM: larger M -------------------------------------------------------------------------
//
// Block tile 64 (x rows) x 128 (weight rows) x 64 (codes), 8 warps as 2 x 4,
// each warp 32 x 32 with mma m16n8k16 (A = x, B = dequantized weight). Each
// 64-code step: cp.async brings x and the packed words into a 3-stage ring,
// every thread dequantizes one 32-code block of one weight row into a
// double-buffered fp16/bf16 tile, and ldmatrix feeds the mma. K is split across
// blocks (grid.z) when the output tiles alone cannot fill the GPU.

constexpr int kGemmBM = 64;
constexpr int kGemmBN = 128;
constexpr int kGemmBK = 64;
constexpr int kGemmThreads = 256;
constexpr int kGemmStages = 3;
constexpr int kGemmMinTilesPerSplit = 4;
// Grid dimension limit for grid.y, which indexes tiles of x rows.
constexpr int64_t kMaxGridY = 65535;

struct GemmPlan {
  int64_t n_tiles;          // grid.x
  int64_t m_tiles;          // grid.y
  int64_t k_tiles;          // 64-code steps covering K; the last may be partial
  int64_t tiles_per_split;  // k steps of one grid.z index
  int splits;               // grid.z
};

LOWBIT_HD constexpr GemmPlan plan_gemm(int64_t m, int64_t n, int64_t k, int sm_count) {
  GemmPlan p{};
  p.n_tiles = ceil_div(n, kGemmBN);
  p.m_tiles = ceil_div(m, kGemmBM);
  p.k_tiles = ceil_div(k, kGemmBK);
  const int64_t wanted = ceil_div(int64_t(sm_count), p.n_tiles * p.m_tiles);
  const int64_t most = max64(1, min64(kMaxSplits, p.k_tiles / kGemmMinTilesPerSplit));
  const int64_t splits = max64(1, min64(wanted, most));
  p.tiles_per_split = ceil_div(p.k_tiles, splits);
  p.splits = int(ceil_div(p.k_tiles, p.tiles_per_split));
  return p;
}

// Words of one weight row that a GEMM step copies: the step's low-plane words,
// then (3-bit) its high-plane words.
LOWBIT_HD constexpr int gemm_low_words(int bits) { return kGemmBK * low_plane_bits(bits) / 32; }
LOWBIT_HD constexpr int gemm_row_words(int bits) {
  return gemm_low_words(bits) + (bits == 3 ? kGemmBK / kBlockCodes : 0);
}
// The 32-code block of the step that word j belongs to.
LOWBIT_HD constexpr int gemm_word_block(int bits, int j) {
  return j < gemm_low_words(bits) ? j / low_plane_bits(bits) : j - gemm_low_words(bits);
}
// Offset of word j in the packed row, for the step starting at code k0 of a row of k codes.
LOWBIT_HD constexpr int64_t gemm_word_offset(int bits, int64_t k, int64_t k0, int j) {
  return j < gemm_low_words(bits)
             ? k0 * low_plane_bits(bits) / 32 + j
             : high_plane_offset(k) + k0 / 32 + (j - gemm_low_words(bits));
}

LOWBIT_HD constexpr int64_t gemm_shared_bytes(int bits) {
  return kGemmStages * (int64_t(kGemmBM) * kGemmBK * 2 + int64_t(kGemmBN) * gemm_row_words(bits) * 4) +
         2 * int64_t(kGemmBN) * kGemmBK * 2;
}

// fp32 partial sums [splits, m, n] that a split-K launch needs, in bytes.
LOWBIT_HD constexpr int64_t split_workspace_bytes(int splits, int64_t m, int64_t n) {
  return splits > 1 ? int64_t(splits) * m * n * 4 : 0;
}

// --- thread-to-data maps of mma.m16n8k16 and ldmatrix (PTX ISA) -----------------------------
//
// A (16 x 16, row-major): lane l holds 4 registers of two values each:
// reg 0 = (row g, k 2t..2t+1), reg 1 = (row g + 8, same k), reg 2 = (row g,
// k 2t+8..2t+9), reg 3 = (row g + 8, k 2t+8..); g = l / 4, t = l % 4.
// B (16 x 8): reg 0 = (k 2t..2t+1, col g), reg 1 = (k 2t+8.., col g).
// C (16 x 8, fp32): c0, c1 = (row g, cols 2t, 2t+1); c2, c3 = (row g + 8, same).

LOWBIT_HD constexpr int mma_a_row(int lane, int reg) { return lane / 4 + 8 * (reg % 2); }
LOWBIT_HD constexpr int mma_a_k(int lane, int reg, int half) {
  return 2 * (lane % 4) + 8 * (reg / 2) + half;
}
LOWBIT_HD constexpr int mma_b_k(int lane, int reg, int half) {
  return 2 * (lane % 4) + 8 * reg + half;
}
LOWBIT_HD constexpr int mma_b_col(int lane) { return lane / 4; }
LOWBIT_HD constexpr int mma_c_row(int lane, int i) { return lane / 4 + 8 * (i / 2); }
LOWBIT_HD constexpr int mma_c_col(int lane, int i) { return 2 * (lane % 4) + i % 2; }

// ldmatrix.x4 loads four 8x8 matrices of 16-bit values; lanes 8i..8i+7 give the
// addresses of the 8 rows of matrix i, and register i of lane l receives
// elements 2(l % 4), 2(l % 4) + 1 of row l / 4 of matrix i.
//
// For the A operand of one m16 x k16 tile, matrix i = (rows 8(i % 2).., k
// chunk i / 2), in 8-value chunks: the register order of A above.
LOWBIT_HD constexpr int ldsm_a_row(int lane) { return lane % 8 + 8 * ((lane / 8) % 2); }
LOWBIT_HD constexpr int ldsm_a_chunk(int lane) { return lane / 16; }
// For the B operand of two n8 tiles from a [n][k] tile: matrix i = (rows
// 8(i / 2).., k chunk i % 2): registers 0, 1 are tile 0's, 2, 3 tile 1's.
LOWBIT_HD constexpr int ldsm_b_row(int lane) { return lane % 8 + 8 * (lane / 16); }
LOWBIT_HD constexpr int ldsm_b_chunk(int lane) { return (lane / 8) % 2; }

// Shared-memory tiles of 64 16-bit values per row store 16-byte chunk c of row
// r at chunk c ^ (r % 8), so that the 8 rows an ldmatrix matrix reads, and the
// 16-byte stores of one row, fall in distinct banks.
LOWBIT_HD constexpr int swizzled_offset(int row, int chunk) {
  return row * 64 + ((chunk ^ (row % 8)) * 8);
}

}  // namespace cuda
}  // namespace lowbit
