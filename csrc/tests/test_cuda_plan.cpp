// The host-side decisions of the CUDA kernels (cuda_plan.h): which kernel runs,
// how the grids cover the work, and the index helpers they rely on.
#include <random>
#include <vector>

#include "check.h"
#include "lowbit/cuda_plan.h"

using namespace lowbit;
using namespace lowbit::cuda;

TEST(fast_division_is_exact) {
  std::mt19937 rng(1);
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 600; ++d) divisors.push_back(d);
  for (int i = 0; i < 200; ++i) divisors.push_back(1 + rng() % (1u << 30));
  for (uint32_t d : divisors) {
    const FastDiv f = make_fast_div(d);
    for (uint32_t n : {0u, 1u, d - 1, d, d + 1, 2 * d - 1, (1u << 31) - 1, (1u << 31) - d}) {
      if (n >= (1u << 31)) continue;
      CHECK(fast_div(n, f) == n / d, "%u / %u", n, d);
    }
    for (int i = 0; i < 200; ++i) {
      const uint32_t n = rng() % (1u << 31);
      CHECK(fast_div(n, f) == n / d, "%u / %u", n, d);
    }
  }
}

TEST(linear_path_thresholds) {
  CHECK(choose_linear_path(1, DType::kF16) == LinearPath::kGemv);
  CHECK(choose_linear_path(kGemvMaxM, DType::kBF16) == LinearPath::kGemv);
  CHECK(choose_linear_path(kGemvMaxM + 1, DType::kF16) == LinearPath::kGemm);
  CHECK(choose_linear_path(kGemmMaxM, DType::kF16) == LinearPath::kGemm);
  CHECK(choose_linear_path(kGemmMaxM + 1, DType::kF16) == LinearPath::kDequantMatmul);
  CHECK(choose_linear_path(1, DType::kF32) == LinearPath::kDequantMatmul);
  // The automatic choice is always supported, and never goes back to a smaller-M kernel.
  int previous = 0;
  for (int64_t m = 0; m < 5000; ++m) {
    const LinearPath p = choose_linear_path(m, DType::kF16);
    CHECK(path_supports(p, m, DType::kF16));
    CHECK(int(p) >= previous, "m %ld", long(m));
    previous = int(p);
  }
  CHECK(!path_supports(LinearPath::kGemv, kGemvMaxM + 1, DType::kF16));
  CHECK(path_supports(LinearPath::kGemm, 1, DType::kF16));
  CHECK(!path_supports(LinearPath::kGemm, 1, DType::kF32));
}

TEST(linear_path_names_round_trip) {
  for (LinearPath p : {LinearPath::kAuto, LinearPath::kGemv, LinearPath::kGemm, LinearPath::kDequantMatmul}) {
    LinearPath back = LinearPath::kGemv;
    CHECK(parse_linear_path(linear_path_name(p), &back) && back == p, "%s", linear_path_name(p));
  }
  LinearPath unused;
  CHECK(!parse_linear_path("gem", &unused) && !parse_linear_path("gemvv", &unused) &&
        !parse_linear_path("", &unused));
}

// Runs the span loop of gemv_kernel for every block and warp, counting how
// often each (row block, span) is visited.
TEST(gemv_grid_covers_every_span_once) {
  std::mt19937 rng(2);
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t n = 1 + rng() % 9000;
    const int64_t k = 32 * (1 + rng() % 300);
    const int sms = trial % 3 == 0 ? 132 : int(1 + rng() % 200);
    const GemvPlan p = plan_gemv(n, k, sms);
    CHECK(p.row_blocks * kGemvRowsPerBlock >= n && (p.row_blocks - 1) * kGemvRowsPerBlock < n);
    CHECK(p.spans * kGemvSpanCodes >= k && (p.spans - 1) * kGemvSpanCodes < k);
    CHECK(p.splits >= 1 && p.splits <= kMaxSplits && p.warps >= 1 && p.warps <= kGemvMaxWarps);
    CHECK(p.warps <= p.spans_per_split, "idle warps: n %ld k %ld", long(n), long(k));
    std::vector<int> visits(p.spans, 0);
    for (int y = 0; y < p.splits; ++y) {
      const int64_t end = min64(p.spans, (y + 1) * p.spans_per_split);
      CHECK(y * p.spans_per_split < end, "empty split %d", y);
      for (int warp = 0; warp < p.warps; ++warp) {
        for (int64_t s = y * p.spans_per_split + warp; s < end; s += p.warps) ++visits[s];
      }
    }
    for (int64_t s = 0; s < p.spans; ++s) CHECK(visits[s] == 1, "span %ld n %ld k %ld", long(s), long(n), long(k));
  }
}

TEST(gemv_splits_only_when_rows_cannot_fill_the_gpu) {
  CHECK(plan_gemv(8192, 8192, 132).splits == 1);
  CHECK(plan_gemv(28672, 8192, 132).splits == 1);
  const GemvPlan small = plan_gemv(4096, 4096, 132);  // 128 row blocks for 132 SMs
  CHECK(small.splits == 2 && small.row_blocks * small.splits >= 132);
  CHECK(plan_gemv(37, 576, 132).splits == 1);  // 3 spans: nothing to split
  CHECK(plan_gemv(37, 8192, 132).splits == 4);  // 32 spans, 8 per warp group
}

TEST(gemm_grid_covers_every_step_once) {
  std::mt19937 rng(4);
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t m = 1 + rng() % 5000, n = 1 + rng() % 9000, k = 32 * (1 + rng() % 300);
    const int sms = int(1 + rng() % 200);
    const GemmPlan p = plan_gemm(m, n, k, sms);
    CHECK(p.n_tiles * kGemmBN >= n && p.m_tiles * kGemmBM >= m && p.k_tiles * kGemmBK >= k);
    CHECK(p.splits >= 1 && p.splits <= kMaxSplits);
    int64_t covered = 0;
    for (int z = 0; z < p.splits; ++z) {
      const int64_t first = z * p.tiles_per_split;
      const int64_t steps = min64(p.k_tiles, first + p.tiles_per_split) - first;
      CHECK(steps >= 1, "empty split");
      covered += steps;
    }
    CHECK(covered == p.k_tiles);
    if (p.splits > 1) CHECK(p.tiles_per_split >= kGemmMinTilesPerSplit - 1);
  }
  CHECK(plan_gemm(4096, 8192, 8192, 132).splits == 1);
  CHECK(plan_gemm(64, 4096, 4096, 132).splits > 1);
}

TEST(workspace_only_for_splits) {
  CHECK(split_workspace_bytes(1, 16, 4096) == 0);
  CHECK(split_workspace_bytes(3, 16, 4096) == 3 * 16 * 4096 * 4);
}

TEST(swizzle_is_a_bijection_within_rows) {
  for (int row = 0; row < 128; ++row) {
    int seen[8] = {};
    for (int chunk = 0; chunk < 8; ++chunk) {
      const int offset = swizzled_offset(row, chunk);
      CHECK(offset >= row * 64 && offset < row * 64 + 64 && offset % 8 == 0);
      ++seen[(offset - row * 64) / 8];
    }
    for (int c = 0; c < 8; ++c) CHECK(seen[c] == 1);
  }
  // The 8 rows an ldmatrix matrix reads hit 8 distinct 16-byte bank groups.
  for (int chunk = 0; chunk < 8; ++chunk) {
    int banks[8] = {};
    for (int row = 0; row < 8; ++row) ++banks[(swizzled_offset(row, chunk) / 8) % 8];
    for (int b = 0; b < 8; ++b) CHECK(banks[b] == 1);
  }
}

TEST(gemm_shared_memory_fits_every_target) {
  // 99 KB is the per-block limit of sm_86/sm_89, the smallest of the default targets.
  for (int bits : {2, 3, 4}) CHECK(gemm_shared_bytes(bits) <= 99 * 1024, "bits %d", bits);
}

TEST(ldmatrix_lane_maps_cover_each_row_once) {
  int a[16][2] = {}, b[16][2] = {};
  for (int lane = 0; lane < 32; ++lane) {
    ++a[ldsm_a_row(lane)][ldsm_a_chunk(lane)];
    ++b[ldsm_b_row(lane)][ldsm_b_chunk(lane)];
  }
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 2; ++c) CHECK(a[r][c] == 1 && b[r][c] == 1);
  }
}

TEST_MAIN()
