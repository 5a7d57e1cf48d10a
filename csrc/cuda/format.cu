// Packing, unpacking and dequantization on the GPU, one thread per 32-code
// block of a row, with the index maths of format.h so that the results are
// bit-identical to the CPU kernels'. Also the reduction of split-K partials.
#include "common.cuh"
#include "lowbit/dispatch.h"
#include "lowbit/format.h"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void pack_kernel(const uint8_t* codes, int64_t n, int64_t k, int bits,
                            uint32_t* packed) {
  const int64_t blocks_per_row = k / kBlockCodes;
  const int64_t row_words = words_per_row(k, bits);
  const int low_bits = low_plane_bits(bits);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * blocks_per_row;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / blocks_per_row, block = i % blocks_per_row;
    const uint8_t* src = codes + row * k + block * kBlockCodes;
    uint32_t* dst = packed + row * row_words;
    pack_plane(src, kBlockCodes, low_bits, 0, dst + block * low_bits);
    if (bits == 3) pack_plane(src, kBlockCodes, 1, 2, dst + high_plane_offset(k) + block);
  }
}

__global__ void unpack_kernel(const uint32_t* packed, int64_t n, int64_t k, int bits,
                              uint8_t* codes) {
  const int64_t blocks_per_row = k / kBlockCodes;
  const int64_t row_words = words_per_row(k, bits);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * blocks_per_row;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / blocks_per_row, first = (i % blocks_per_row) * kBlockCodes;
    uint32_t out[kBlockCodes / 4];
#pragma unroll
    for (int w = 0; w < kBlockCodes / 4; ++w) {
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        word |= get_code(packed + row * row_words, k, bits, first + 4 * w + j) << (8 * j);
      }
      out[w] = word;
    }
    uint4* dst = reinterpret_cast<uint4*>(codes + row * k + first);  // k % 32 == 0: aligned
    dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
    dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
  }
}

// The output formats of dequantize: fp32, or 16-bit through a decode format.
struct Float32Out {
  static constexpr int kBytes = 4;
};
struct F16Out : F16 {
  static constexpr int kBytes = 2;
};
struct BF16Out : BF16 {
  static constexpr int kBytes = 2;
};

template <class Out>
__device__ __forceinline__ void store_block(const float* v, void* dst) {
  uint4* out = static_cast<uint4*>(dst);
  if constexpr (Out::kBytes == 4) {
#pragma unroll
    for (int i = 0; i < kBlockCodes / 4; ++i) {
      out[i] = make_uint4(__float_as_uint(v[4 * i]), __float_as_uint(v[4 * i + 1]),
                          __float_as_uint(v[4 * i + 2]), __float_as_uint(v[4 * i + 3]));
    }
  } else {
    Pair p[kBlockCodes / 2];
#pragma unroll
    for (int i = 0; i < kBlockCodes / 2; ++i) p[i] = Out::from_floats(v[2 * i], v[2 * i + 1]);
#pragma unroll
    for (int i = 0; i < kBlockCodes / 8; ++i) {
      out[i] = make_uint4(p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]);
    }
  }
}

template <int kBits, class Out>
__global__ void dequantize_kernel(const QuantMatrix w, FastDiv blocks_per_group, void* out) {
  constexpr int kLowBits = low_plane_bits(kBits);
  constexpr int kPerWord = codes_per_word(kLowBits);
  const int64_t blocks_per_row = w.k / kBlockCodes;
  const int64_t row_words = words_per_row(w.k, kBits);
  const int64_t groups = w.k / w.group_size;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < w.n * blocks_per_row;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / blocks_per_row, block = i % blocks_per_row;
    const uint32_t* src = w.packed + row * row_words;
    uint32_t low[kLowBits];
#pragma unroll
    for (int j = 0; j < kLowBits; ++j) low[j] = src[block * kLowBits + j];
    const uint32_t high = kBits == 3 ? src[high_plane_offset(w.k) + block] : 0u;
    const int64_t g = row * groups + fast_div(uint32_t(block), blocks_per_group);
    const float s = load_float(w.scales, w.scale_dtype, g);
    const float z = load_float(w.zeros, w.scale_dtype, g);
    float v[kBlockCodes];
#pragma unroll
    for (int c = 0; c < kBlockCodes; ++c) {
      uint32_t q = (low[c / kPerWord] >> (kLowBits * (c % kPerWord))) & field_mask(kLowBits);
      if (kBits == 3) q |= ((high >> c) & 1u) << 2;
      v[c] = s * (float(q) - z);  // the CPU kernel's expression: same rounding
    }
    store_block<Out>(v, static_cast<char*>(out) + (row * w.k + block * kBlockCodes) * Out::kBytes);
  }
}

template <class Out>
void launch_dequantize(const QuantMatrix& w, void* out, cudaStream_t stream) {
  const FastDiv per_group = make_fast_div(uint32_t(w.group_size / kBlockCodes));
  const unsigned grid = grid_for(w.n * (w.k / kBlockCodes), kThreads);
  dispatch_bits(w.bits, [&](auto bits) {
    dequantize_kernel<decltype(bits)::value, Out><<<grid, kThreads, 0, stream>>>(w, per_group, out);
  });
}

template <class Format>
__global__ void reduce_splits_kernel(const float* workspace, int splits, int64_t m, int64_t n,
                                     const void* bias, DType bias_dtype, void* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < m * n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += workspace[s * m * n + i];  // fixed order: deterministic
    if (bias != nullptr) v += load_float(bias, bias_dtype, i % n);
    store<Format>(y, i, v);
  }
}

}  // namespace

cudaError_t pack(const uint8_t* codes, int64_t n, int64_t k, int bits, uint32_t* packed,
                 cudaStream_t stream) {
  require_supported_bits(bits);
  if (n == 0) return cudaSuccess;
  pack_kernel<<<grid_for(n * (k / kBlockCodes), kThreads), kThreads, 0, stream>>>(codes, n, k,
                                                                                  bits, packed);
  return cudaGetLastError();
}

cudaError_t unpack(const uint32_t* packed, int64_t n, int64_t k, int bits, uint8_t* codes,
                   cudaStream_t stream) {
  require_supported_bits(bits);
  if (n == 0) return cudaSuccess;
  unpack_kernel<<<grid_for(n * (k / kBlockCodes), kThreads), kThreads, 0, stream>>>(packed, n, k,
                                                                                    bits, codes);
  return cudaGetLastError();
}

cudaError_t dequantize(const QuantMatrix& w, void* out, DType out_dtype, cudaStream_t stream) {
  require_supported_bits(w.bits);
  if (w.n == 0) return cudaSuccess;
  switch (out_dtype) {
    case DType::kF16: launch_dequantize<F16Out>(w, out, stream); break;
    case DType::kBF16: launch_dequantize<BF16Out>(w, out, stream); break;
    default: launch_dequantize<Float32Out>(w, out, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t reduce_splits(const float* workspace, int splits, int64_t m, int64_t n,
                          const void* bias, DType bias_dtype, void* y, DType y_dtype,
                          cudaStream_t stream) {
  const unsigned grid = grid_for(m * n, kThreads);
  if (y_dtype == DType::kBF16) {
    reduce_splits_kernel<BF16><<<grid, kThreads, 0, stream>>>(workspace, splits, m, n, bias,
                                                              bias_dtype, y);
  } else {
    reduce_splits_kernel<F16><<<grid, kThreads, 0, stream>>>(workspace, splits, m, n, bias,
                                                             bias_dtype, y);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lowbit
