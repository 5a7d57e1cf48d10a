// Fused dequantize-GEMM for larger M on tensor cores (see cuda_plan.h): x and
// the packed weight stream into shared memory with cp.async, each step's
// weight tile is dequantized once into shared memory, and ldmatrix + mma.sync
// m16n8k16 do the arithmetic with fp32 accumulators.
#include "common.cuh"

namespace lowbit {
namespace cuda {
namespace {

using GemmParams = LinearParams<GemmPlan>;

// Shared-memory layout of one block: a ring of kGemmStages (x tile, packed
// tile) pairs, then two dequantized weight tiles.
template <int kBits>
struct Tiles {
  static constexpr int kPlaneBits = low_plane_bits(kBits);
  static constexpr int kLowWords = gemm_low_words(kBits);  // per weight row and step
  static constexpr int kRowWords = gemm_row_words(kBits);
  static constexpr int kXValues = kGemmBM * kGemmBK;
  static constexpr int kPackedWords = kGemmBN * kRowWords;
  static constexpr int kWeightValues = kGemmBN * kGemmBK;
  static constexpr int kXBytes = kGemmStages * kXValues * 2;
  static constexpr int kPackedBytes = kGemmStages * kPackedWords * 4;
  static constexpr int kBytes = kXBytes + kPackedBytes + 2 * kWeightValues * 2;
  static_assert(kBytes == gemm_shared_bytes(kBits), "shared memory size mismatch");
};

template <class Format, int kBits>
__global__ void __launch_bounds__(kGemmThreads, 2) gemm_kernel(const GemmParams p) {
  using L = Tiles<kBits>;
  extern __shared__ __align__(16) unsigned char shared[];
  uint16_t* x_tiles = reinterpret_cast<uint16_t*>(shared);
  uint32_t* packed_tiles = reinterpret_cast<uint32_t*>(shared + L::kXBytes);
  uint16_t* weight_tiles = reinterpret_cast<uint16_t*>(shared + L::kXBytes + L::kPackedBytes);

  const QuantMatrix& w = p.w;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / 4, warp_n = warp % 4;  // 2 x 4 warps of 32 x 32
  const int64_t n0 = int64_t(blockIdx.x) * kGemmBN, m0 = int64_t(blockIdx.y) * kGemmBM;
  const int64_t first_step = int64_t(blockIdx.z) * p.plan.tiles_per_split;
  const int64_t steps = min64(p.plan.k_tiles, first_step + p.plan.tiles_per_split) - first_step;
  const int64_t row_words = words_per_row(w.k, kBits);

  // Issues the copies of step s into ring slot `slot`; past-the-end rows and
  // blocks become zeros.
  auto load_step = [&](int64_t s, int slot) {
    const int64_t k0 = (first_step + s) * kGemmBK;
    uint16_t* xt = x_tiles + slot * L::kXValues;
    for (int c = tid; c < kGemmBM * 8; c += kGemmThreads) {
      const int r = c / 8, chunk = c % 8;
      const int64_t row = m0 + r, code = k0 + 8 * chunk;
      const bool valid = row < p.m && code < w.k;
      cp_async_16(xt + swizzled_offset(r, chunk), valid ? p.x + row * p.x_stride + code : p.x, valid);
    }
    uint32_t* pt = packed_tiles + slot * L::kPackedWords;
    for (int c = tid; c < L::kPackedWords; c += kGemmThreads) {
      const int r = c / L::kRowWords, j = c % L::kRowWords;
      const int64_t row = n0 + r;
      const bool valid = row < w.n && k0 + kBlockCodes * gemm_word_block(kBits, j) < w.k;
      const uint32_t* src = w.packed + row * row_words + gemm_word_offset(kBits, w.k, k0, j);
      cp_async_4(pt + c, valid ? src : w.packed, valid);
    }
  };

  // Each thread dequantizes one 32-code block of one weight row of step s.
  const int my_row = tid / 2, my_block = tid % 2;
  const int64_t my_weight_row = n0 + my_row;
  auto group_of = [&](int64_t s) {
    return fast_div(uint32_t(((first_step + s) * kGemmBK) / kBlockCodes + my_block),
                    p.blocks_per_group);
  };
  auto block_valid = [&](int64_t s) {
    return my_weight_row < w.n && (first_step + s) * kGemmBK + kBlockCodes * my_block < w.k;
  };
  auto dequantize_step = [&](int64_t s, int slot, int buffer, Pair scale, Pair offset) {
    Pair v[16] = {};
    if (block_valid(s)) {
      const uint32_t* row = packed_tiles + slot * L::kPackedWords + my_row * L::kRowWords;
      const uint32_t high = kBits == 3 ? row[L::kLowWords + my_block] : 0u;
      decode::block_pairs_in_order<Format, kBits>(row + my_block * L::kPlaneBits, high, scale,
                                                  offset, v);
    }
    uint16_t* wt = weight_tiles + buffer * L::kWeightValues;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      *reinterpret_cast<uint4*>(wt + swizzled_offset(my_row, 4 * my_block + i)) =
          make_uint4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    }
  };

  float acc[2][4][4] = {};
  for (int s = 0; s < kGemmStages - 1; ++s) {
    if (s < steps) load_step(s, s);
    cp_async_commit();
  }
  // Scales of the next step are loaded one step ahead.
  Pair scale = 0u, offset = 0u;
  if (steps > 0 && block_valid(0)) load_group<Format>(w, my_weight_row, group_of(0), &scale, &offset);

  for (int64_t s = 0; s < steps; ++s) {
    const int slot = int(s % kGemmStages), buffer = int(s % 2);
    cp_async_wait<kGemmStages - 2>();  // step s has landed
    __syncthreads();
    dequantize_step(s, slot, buffer, scale, offset);
    if (s + 1 < steps && block_valid(s + 1)) {
      load_group<Format>(w, my_weight_row, group_of(s + 1), &scale, &offset);
    }
    if (s + kGemmStages - 1 < steps) load_step(s + kGemmStages - 1, int((s + kGemmStages - 1) % kGemmStages));
    cp_async_commit();
    __syncthreads();  // the dequantized tile is complete

    const uint16_t* xt = x_tiles + slot * L::kXValues;
    const uint16_t* wt = weight_tiles + buffer * L::kWeightValues;
#pragma unroll
    for (int kk = 0; kk < kGemmBK / 16; ++kk) {
      Pair a[2][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        ldmatrix_x4(a[mi], xt + swizzled_offset(32 * warp_m + 16 * mi + ldsm_a_row(lane),
                                                2 * kk + ldsm_a_chunk(lane)));
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        Pair r[4];
        ldmatrix_x4(r, wt + swizzled_offset(32 * warp_n + 16 * nj + ldsm_b_row(lane),
                                            2 * kk + ldsm_b_chunk(lane)));
        b[2 * nj][0] = r[0], b[2 * nj][1] = r[1], b[2 * nj + 1][0] = r[2], b[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma<Format>(acc[mi][ni], a[mi], b[ni]);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = m0 + 32 * warp_m + 16 * mi + mma_c_row(lane, e);
        const int64_t col = n0 + 32 * warp_n + 8 * ni + mma_c_col(lane, e);
        if (row >= p.m || col >= w.n) continue;
        float v = acc[mi][ni][e];
        if (p.plan.splits == 1) {
          if (p.bias != nullptr) v += load_float(p.bias, p.bias_dtype, col);
          store<Format>(p.y, row * w.n + col, v);
        } else {
          p.workspace[(blockIdx.z * p.m + row) * w.n + col] = v;
        }
      }
    }
  }
}

template <class Format, int kBits>
cudaError_t launch(const GemmParams& p, cudaStream_t stream) {
  const int bytes = Tiles<kBits>::kBytes;
  const cudaError_t status = cudaFuncSetAttribute(
      gemm_kernel<Format, kBits>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (status != cudaSuccess) return status;
  const dim3 grid(unsigned(p.plan.n_tiles), unsigned(p.plan.m_tiles), unsigned(p.plan.splits));
  gemm_kernel<Format, kBits><<<grid, kGemmThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t run_gemm(const LinearArgs& a, float* workspace, int sm_count, cudaStream_t stream) {
  const GemmPlan plan = plan_gemm(a.m, a.w.n, a.w.k, sm_count);
  if (plan.m_tiles > kMaxGridY) return cudaErrorInvalidConfiguration;
  return run_linear(a, workspace, plan, stream,
                    [](auto format, auto bits, const GemmParams& p, cudaStream_t s) {
                      return launch<decltype(format), decltype(bits)::value>(p, s);
                    });
}

}  // namespace cuda
}  // namespace lowbit
