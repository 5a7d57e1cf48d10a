// Which kernel the CUDA `linear` runs: lowbit::cuda::choose_linear_path, unless
// a process-wide override (lowbit.kernels.backends.use_cuda_linear_path, for
// tests and benchmarks) forces one. Shared by the CUDA binding and the Python
// module.
#pragma once

#include <c10/util/Exception.h>

#include <atomic>

#include "lowbit/cuda_plan.h"

namespace lowbit {
namespace binding {

inline std::atomic<int32_t>& forced_linear_path_slot() {
  static std::atomic<int32_t> slot{static_cast<int32_t>(cuda::LinearPath::kAuto)};
  return slot;
}

inline cuda::LinearPath forced_linear_path() {
  return static_cast<cuda::LinearPath>(forced_linear_path_slot().load());
}

inline cuda::LinearPath parse_linear_path_or_throw(const std::string& name) {
  cuda::LinearPath path;
  TORCH_CHECK_VALUE(cuda::parse_linear_path(name.c_str(), &path),
                    "lowbit: unknown CUDA linear path '", name,
                    "'; choose auto, gemv, gemm or dequant_matmul");
  return path;
}

// The path for `m` rows of x: the forced one if any (fp32 activations always
// take dequant_matmul), else choose_linear_path.
inline cuda::LinearPath linear_path_for(int64_t m, DType x_dtype) {
  const cuda::LinearPath forced = forced_linear_path();
  if (forced == cuda::LinearPath::kAuto || x_dtype == DType::kF32) {
    return cuda::choose_linear_path(m, x_dtype);
  }
  TORCH_CHECK_VALUE(cuda::path_supports(forced, m, x_dtype), "lowbit: the CUDA linear path '",
                    cuda::linear_path_name(forced), "' handles at most ", cuda::kGemvMaxM,
                    " rows of x, got ", m);
  return forced;
}

}  // namespace binding
}  // namespace lowbit
