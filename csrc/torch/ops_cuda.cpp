// Binds the lowbit ops to the torch-free CUDA kernels (lowbit/cuda.h). Every
// op runs on the current stream of its tensors' device, allocates only through
// torch's caching allocator and never waits for the GPU (pack excepted, which
// validates its codes), so linear, dequantize and unpack can be captured in
// CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "checks.h"
#include "linear_path.h"
#include "lowbit/cuda.h"

namespace lowbit {
namespace binding {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lowbit: ", name, " is on ", t.device(),
              "; this kernel runs on CUDA devices");
}

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// The device's multiprocessor count, read once per device.
int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  TORCH_CHECK(device >= 0 && device < int(cache.size()), "lowbit: unexpected CUDA device ", device);
  int count = cache[device].load();
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count);
  }
  return count;
}

at::Tensor pack_cuda(const at::Tensor& codes, int64_t bits) {
  check_pack(meta_of(codes), bits);
  check_cuda(codes, "codes");
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor c = codes.contiguous();
  check_code_values(c, bits);
  at::Tensor out = new_output({c.size(0), words_per_row(c.size(1), bits)}, c.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::pack(c.data_ptr<uint8_t>(), c.size(0), c.size(1), static_cast<int>(bits),
                            reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), current_stream(c)));
  return out;
}

at::Tensor unpack_cuda(const at::Tensor& packed, int64_t bits, int64_t in_features) {
  check_unpack(meta_of(packed), bits, in_features);
  check_cuda(packed, "packed");
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = packed.contiguous();
  at::Tensor out = new_output({p.size(0), in_features}, p.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::unpack(reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>()), p.size(0),
                              in_features, static_cast<int>(bits), out.data_ptr<uint8_t>(),
                              current_stream(p)));
  return out;
}

at::Tensor dequantize_cuda(const at::Tensor& packed, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t bits, int64_t group_size) {
  const int64_t k =
      check_dequantize(meta_of(packed), meta_of(scales), meta_of(zeros), bits, group_size);
  check_cuda(packed, "packed");
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = packed.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  at::Tensor out = new_output({p.size(0), k}, s.options());
  C10_CUDA_CHECK(cuda::dequantize(quant_matrix(p, s, z, k, bits, group_size), out.data_ptr(),
                                  to_dtype(out.scalar_type()), current_stream(p)));
  return out;
}

// x as [m, k] rows that the kernels can read with 16-byte accesses.
at::Tensor rows_of(const at::Tensor& x, int64_t k) {
  at::Tensor x2 = x.reshape({-1, k});
  const bool aligned = x2.stride(1) == 1 && (x2.size(0) <= 1 || x2.stride(0) % 8 == 0) &&
                       reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 == 0;
  return aligned ? x2 : x2.clone(at::MemoryFormat::Contiguous);
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t bits, int64_t group_size,
                       const c10::optional<at::Tensor>& bias) {
  check_linear(meta_of(x), meta_of(packed), meta_of(scales), meta_of(zeros), bits, group_size,
               meta_of(bias));
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = x.size(-1), n = packed.size(0);
  const at::Tensor p = packed.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  const at::Tensor x2 = rows_of(x, k);
  const int64_t m = x2.size(0);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  at::Tensor y = new_output({m, n}, x.options());
  if (m == 0 || n == 0) return y.view(linear_out_shape(x, n));

  const DType x_dtype = to_dtype(x.scalar_type());
  const cuda::QuantMatrix w = quant_matrix(p, s, z, k, bits, group_size);
  const cudaStream_t stream = current_stream(x);
  const cuda::LinearPath path = linear_path_for(m, x_dtype);
  if (path == cuda::LinearPath::kDequantMatmul) {
    at::Tensor weight = at::empty({n, k}, x.options());
    C10_CUDA_CHECK(cuda::dequantize(w, weight.data_ptr(), x_dtype, stream));
    if (b.defined()) {
      at::addmm_out(y, b.to(x.scalar_type()), x2, weight.t());
    } else {
      at::mm_out(y, x2, weight.t());
    }
  } else {
    const int sms = sm_count(x.device().index());
    const int64_t bytes = cuda::linear_workspace_bytes(path, m, n, k, sms);
    at::Tensor workspace;
    if (bytes > 0) workspace = at::empty({bytes / 4}, x.options().dtype(at::kFloat));
    const cuda::LinearArgs args{w,  x2.data_ptr(), x_dtype, m, x2.stride(0),
                                b.defined() ? b.data_ptr() : nullptr,
                                b.defined() ? to_dtype(b.scalar_type()) : DType::kF32,
                                y.data_ptr()};
    C10_CUDA_CHECK(cuda::linear(path, args,
                                workspace.defined() ? workspace.data_ptr<float>() : nullptr, sms,
                                stream));
  }
  return y.view(linear_out_shape(x, n));
}

}  // namespace
}  // namespace binding
}  // namespace lowbit

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  using namespace lowbit::binding;
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("linear", &linear_cuda);
}
