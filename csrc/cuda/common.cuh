// Device building blocks of the lowbit CUDA kernels: tensor-core and
// asynchronous-copy instructions (sm_80+), loads, and the launchers each
// kernel file exports to linear.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lowbit/cuda.h"
#include "lowbit/cuda_plan.h"
#include "lowbit/decode.h"
#include "lowbit/dispatch.h"

namespace lowbit {
namespace cuda {

using decode::BF16;
using decode::F16;
using decode::Pair;

// D = A B + D for one m16n8k16 tile, fp32 accumulators (maps in cuda_plan.h).
template <class Format>
__device__ __forceinline__ void mma(float* c, const Pair* a, const Pair* b);

template <>
__device__ __forceinline__ void mma<F16>(float* c, const Pair* a, const Pair* b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma<BF16>(float* c, const Pair* a, const Pair* b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit values from shared memory (maps in cuda_plan.h).
__device__ __forceinline__ void ldmatrix_x4(Pair* r, const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address))
               : "memory");
}

// Asynchronous global-to-shared copies; an invalid source copies zeros instead
// (the pointer is then not read, but must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// `count` words at p (count is kWords, kWords / 2 or 0; the rest are zeros),
// streamed past the caches since weights are read once: 16- or 8-byte
// accesses when p's alignment allows, else single words.
template <int kWords>
__device__ __forceinline__ void load_words(const uint32_t* p, int count, uint32_t* out) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  if constexpr (kWords % 4 == 0) {
    if (count == kWords && address % 16 == 0) {
#pragma unroll
      for (int i = 0; i < kWords / 4; ++i) {
        const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p) + i);
        out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
      }
      return;
    }
  }
  if constexpr (kWords == 2) {
    if (count == 2 && address % 8 == 0) {
      const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
      out[0] = v.x, out[1] = v.y;
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kWords; ++i) out[i] = i < count ? __ldcs(p + i) : 0u;
}

// A scale, zero or bias element as fp32, whatever its stored float format.
__device__ __forceinline__ float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF16: return __half2float(__ldg(static_cast<const __half*>(p) + i));
    case DType::kBF16: return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(p) + i));
    default: return __ldg(static_cast<const float*>(p) + i);
  }
}

// The scale of group `group` of `row` and the offset m = -scale * zero, each as
// a pair (the same value twice) for the paired multiply-add of decode::scaled.
template <class Format>
__device__ __forceinline__ void load_group(const QuantMatrix& w, int64_t row, uint32_t group,
                                           Pair* scale, Pair* offset) {
  const int64_t i = row * (w.k / w.group_size) + group;
  const float s = load_float(w.scales, w.scale_dtype, i);
  const float m = -s * load_float(w.zeros, w.scale_dtype, i);
  *scale = Format::from_floats(s, s);
  *offset = Format::from_floats(m, m);
}

template <class Format>
__device__ __forceinline__ void store(void* y, int64_t i, float v) {
  static_cast<uint16_t*>(y)[i] = Format::from_float(v);
}

// Launchers of the kernel files, called by linear.cu after validation.
cudaError_t run_gemv(const LinearArgs& args, float* workspace, int sm_count, cudaStream_t stream);
cudaError_t run_gemm(const LinearArgs& args, float* workspace, int sm_count, cudaStream_t stream);
// y[m, n] = sum over splits of workspace[s, m, n] (+ bias), in y_dtype.
cudaError_t reduce_splits(const float* workspace, int splits, int64_t m, int64_t n,
                          const void* bias, DType bias_dtype, void* y, DType y_dtype,
                          cudaStream_t stream);

// The parameters of the fused linear kernels (gemv.cu, gemm.cu), passed by
// value; `Plan` is the kernel's GemvPlan or GemmPlan.
template <class Plan>
struct LinearParams {
  QuantMatrix w;
  const uint16_t* x;
  int64_t m;
  int64_t x_stride;
  const void* bias;
  DType bias_dtype;
  void* y;
  float* workspace;  // [splits, m, n] fp32 partials when plan.splits > 1
  Plan plan;
  FastDiv blocks_per_group;
};

// What run_gemv and run_gemm share: fills the parameters, runs
// `launch(Format{}, Bits<kBits>{}, params, stream)` (which returns the launch
// status) for x's 16-bit format and the weight's width, then adds up the
// split-K partials.
template <class Plan, class Launch>
cudaError_t run_linear(const LinearArgs& a, float* workspace, const Plan& plan, cudaStream_t stream,
                       Launch&& launch) {
  LinearParams<Plan> p{};
  p.w = a.w;
  p.x = static_cast<const uint16_t*>(a.x);
  p.m = a.m;
  p.x_stride = a.x_stride;
  p.bias = a.bias;
  p.bias_dtype = a.bias_dtype;
  p.y = a.y;
  p.workspace = workspace;
  p.plan = plan;
  p.blocks_per_group = make_fast_div(uint32_t(a.w.group_size / kBlockCodes));
  cudaError_t status = dispatch_bits(a.w.bits, [&](auto bits) {
    return a.x_dtype == DType::kBF16 ? launch(BF16{}, bits, p, stream)
                                     : launch(F16{}, bits, p, stream);
  });
  if (status == cudaSuccess && p.plan.splits > 1) {
    status = reduce_splits(workspace, p.plan.splits, a.m, a.w.n, a.bias, a.bias_dtype, a.y,
                           a.x_dtype, stream);
  }
  return status;
}

// Blocks of a grid-stride launch over `count` items.
inline unsigned grid_for(int64_t count, int threads) {
  return unsigned(min64(max64(1, ceil_div(count, threads)), int64_t(1) << 20));
}

}  // namespace cuda
}  // namespace lowbit
