// Fused dequantize-GEMV for up to 16 rows of x, on tensor cores: the weight
// rows are the mma's A operand (16 per tile), the rows of x its B columns
// (8 per tile). See cuda_plan.h for how lanes, chunks and spans map onto the
// weight; decode.h for the decoding.
#include "common.cuh"

namespace lowbit {
namespace cuda {
namespace {

using decode::Chunk;

using GemvParams = LinearParams<GemvPlan>;

// The words of one row's chunk starting at code `first` (zeros past the
// `blocks` valid 32-code blocks).
template <int kBits>
__device__ __forceinline__ void load_chunk(const uint32_t* row, int64_t k, int64_t first,
                                           int blocks, uint32_t* words) {
  using C = Chunk<kBits>;
  load_words<C::kLowWords>(row + C::low_offset(first), blocks * C::kLowWordsPerBlock, words);
  if constexpr (kBits == 3) {
    load_words<C::kHighWords>(row + C::high_offset(k, first), blocks, words + C::kLowWords);
  }
}

// The chunk's 64 activations of one row of x as 32 words (zeros past `blocks`).
// x is read by every block, so it goes through the caches.
__device__ __forceinline__ void load_activations(const uint16_t* x, int blocks, uint32_t* words) {
  const uint4* src = reinterpret_cast<const uint4*>(x);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint4 v = i < 4 * blocks ? __ldg(src + i) : make_uint4(0, 0, 0, 0);
    words[4 * i] = v.x, words[4 * i + 1] = v.y, words[4 * i + 2] = v.z, words[4 * i + 3] = v.w;
  }
}

template <class Format, int kBits, int kColTiles>
// One column tile fits in 128 registers, so two blocks share a multiprocessor.
__global__ void __launch_bounds__(kGemvMaxWarps * 32, kColTiles == 1 ? 2 : 1)
    gemv_kernel(const GemvParams p) {
  using C = Chunk<kBits>;
  constexpr int kRowTiles = kGemvRowsPerBlock / 16;
  const QuantMatrix& w = p.w;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row_words = words_per_row(w.k, kBits);
  const int64_t first_row = int64_t(blockIdx.x) * kGemvRowsPerBlock;
  const int64_t span_end = min64(p.plan.spans, (blockIdx.y + 1) * p.plan.spans_per_split);

  // This lane's weight rows: tile i, half h -> first_row + 16 i + 8 h + g. Its
  // x rows (the mma's B columns): 8 c + g, clamped to memory that exists; the
  // columns past m are computed and dropped.
  const uint16_t* x_rows[kColTiles];
#pragma unroll
  for (int c = 0; c < kColTiles; ++c) x_rows[c] = p.x + min64(8 * c + g, p.m - 1) * p.x_stride;

  float acc[kRowTiles][kColTiles][4] = {};
#pragma unroll 1
  for (int64_t span = blockIdx.y * p.plan.spans_per_split + warp; span < span_end; span += warps) {
    const int64_t first = span * kGemvSpanCodes + C::kCodes * t;  // this lane's chunk
    const int blocks = int(max64(0, min64(2, (w.k - first) / kBlockCodes)));
    const uint32_t block_index = uint32_t(first / kBlockCodes);
    const uint32_t groups[2] = {fast_div(block_index, p.blocks_per_group),
                                fast_div(block_index + 1, p.blocks_per_group)};

    uint32_t words[kRowTiles][2][C::kWords];
    Pair scale[kRowTiles][2][2], offset[kRowTiles][2][2];
#pragma unroll
    for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = first_row + 16 * i + 8 * h + g;
        const bool valid = row < w.n;
        load_chunk<kBits>(w.packed + row * row_words, w.k, first, valid ? blocks : 0, words[i][h]);
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          scale[i][h][b] = offset[i][h][b] = 0u;
          if (valid && b < blocks) load_group<Format>(w, row, groups[b], &scale[i][h][b], &offset[i][h][b]);
        }
      }
    }
    uint32_t x_words[kColTiles][32];
#pragma unroll
    for (int c = 0; c < kColTiles; ++c) load_activations(x_rows[c] + first, blocks, x_words[c]);

#pragma unroll
    for (int wi = 0; wi < C::kLowWords; ++wi) {
      const int b = wi / C::kLowWordsPerBlock;
      Pair xp[kColTiles][C::kPairsPerWord];  // the activations of this word's pairs
#pragma unroll
      for (int c = 0; c < kColTiles; ++c) {
#pragma unroll
        for (int j = 0; j < C::kPairsPerWord; ++j) {
          xp[c][j] = decode::activation_pair<kBits>(x_words[c], wi * C::kPairsPerWord + j);
        }
      }
#pragma unroll
      for (int i = 0; i < kRowTiles; ++i) {
        Pair q[2][C::kPairsPerWord];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          decode::chunk_word_pairs<Format, kBits>(words[i][h], wi, q[h]);
#pragma unroll
          for (int j = 0; j < C::kPairsPerWord; ++j) {
            q[h][j] = decode::scaled<Format>(q[h][j], scale[i][h][b], offset[i][h][b]);
          }
        }
        // Each mma takes two pairs per row: k slots (2t, 2t+1) <- pair j, (2t+8, 2t+9) <- pair j+1.
#pragma unroll
        for (int j = 0; j < C::kPairsPerWord; j += 2) {
          const Pair a[4] = {q[0][j], q[1][j], q[0][j + 1], q[1][j + 1]};
#pragma unroll
          for (int c = 0; c < kColTiles; ++c) {
            const Pair bx[2] = {xp[c][j], xp[c][j + 1]};
            mma<Format>(acc[i][c], a, bx);
          }
        }
      }
    }
  }

  // The block's warps add their partial sums in a fixed order (deterministic).
  __shared__ float partial[kGemvMaxWarps][kGemvRowsPerBlock][8 * kColTiles + 1];
#pragma unroll
  for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
    for (int c = 0; c < kColTiles; ++c) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        partial[warp][16 * i + mma_c_row(lane, e)][8 * c + mma_c_col(lane, e)] = acc[i][c][e];
      }
    }
  }
  __syncthreads();
  const int cols = int(min64(p.m, 8 * kColTiles));
  for (int idx = threadIdx.x; idx < kGemvRowsPerBlock * cols; idx += blockDim.x) {
    const int r = idx % kGemvRowsPerBlock, col = idx / kGemvRowsPerBlock;
    const int64_t row = first_row + r;
    if (row >= w.n) continue;
    float v = 0.0f;
    for (int k = 0; k < warps; ++k) v += partial[k][r][col];
    if (p.plan.splits == 1) {
      if (p.bias != nullptr) v += load_float(p.bias, p.bias_dtype, row);
      store<Format>(p.y, col * w.n + row, v);
    } else {
      p.workspace[(blockIdx.y * p.m + col) * w.n + row] = v;
    }
  }
}

template <class Format, int kBits>
cudaError_t launch(const GemvParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.plan.row_blocks), unsigned(p.plan.splits));
  const unsigned threads = unsigned(p.plan.warps * 32);
  if (p.m <= 8) {
    gemv_kernel<Format, kBits, 1><<<grid, threads, 0, stream>>>(p);
  } else {
    gemv_kernel<Format, kBits, 2><<<grid, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t run_gemv(const LinearArgs& a, float* workspace, int sm_count, cudaStream_t stream) {
  return run_linear(a, workspace, plan_gemv(a.w.n, a.w.k, sm_count), stream,
                    [](auto format, auto bits, const GemvParams& p, cudaStream_t s) {
                      return launch<decltype(format), decltype(bits)::value>(p, s);
                    });
}

}  // namespace cuda
}  // namespace lowbit
