// Entry points of the fused linear kernels: workspace sizes and dispatch.
#include "common.cuh"

namespace lowbit {
namespace cuda {

int64_t linear_workspace_bytes(LinearPath path, int64_t m, int64_t n, int64_t k, int sm_count) {
  switch (path) {
    case LinearPath::kGemv: return split_workspace_bytes(plan_gemv(n, k, sm_count).splits, m, n);
    case LinearPath::kGemm:
      return split_workspace_bytes(plan_gemm(m, n, k, sm_count).splits, m, n);
    default: return 0;
  }
}

cudaError_t linear(LinearPath path, const LinearArgs& args, float* workspace, int sm_count,
                   cudaStream_t stream) {
  require_supported_bits(args.w.bits);
  if (!path_supports(path, args.m, args.x_dtype) || path == LinearPath::kDequantMatmul) {
    return cudaErrorInvalidValue;
  }
  if (args.m == 0 || args.w.n == 0) return cudaSuccess;
  return path == LinearPath::kGemv ? run_gemv(args, workspace, sm_count, stream)
                                   : run_gemm(args, workspace, sm_count, stream);
}

}  // namespace cuda
}  // namespace lowbit
