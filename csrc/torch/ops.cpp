// Registers the lowbit ops with the PyTorch dispatcher and binds them to the
// torch-free CPU kernels. Fake (meta) implementations and autograd formulas
// are registered from Python (lowbit/kernels/ops.py); the fakes validate
// through the check_* functions exported here, the checks of checks.h.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

#include "checks.h"
#include "linear_path.h"
#include "lowbit/cpu.h"

namespace lowbit {
namespace binding {
namespace {

struct TorchParallel final : cpu::Parallel {
  void for_range(int64_t n, int64_t grain, cpu::RangeFn fn) const override {
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(b, e); });
  }
};

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lowbit: ", name, " is on ", t.device(),
              "; this kernel runs on the CPU");
}

at::Tensor pack_cpu(const at::Tensor& codes, int64_t bits) {
  check_pack(meta_of(codes), bits);
  check_cpu(codes, "codes");
  const at::Tensor c = codes.contiguous();
  check_code_values(c, bits);
  at::Tensor out = new_output({c.size(0), words_per_row(c.size(1), bits)}, c.options().dtype(at::kInt));
  cpu::pack(c.data_ptr<uint8_t>(), c.size(0), c.size(1), static_cast<int>(bits),
            reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), TorchParallel());
  return out;
}

at::Tensor unpack_cpu(const at::Tensor& packed, int64_t bits, int64_t in_features) {
  check_unpack(meta_of(packed), bits, in_features);
  check_cpu(packed, "packed");
  const at::Tensor p = packed.contiguous();
  at::Tensor out = new_output({p.size(0), in_features}, p.options().dtype(at::kByte));
  cpu::unpack(reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>()), p.size(0), in_features,
              static_cast<int>(bits), out.data_ptr<uint8_t>(), TorchParallel());
  return out;
}

at::Tensor dequantize_cpu(const at::Tensor& packed, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group_size) {
  const int64_t k =
      check_dequantize(meta_of(packed), meta_of(scales), meta_of(zeros), bits, group_size);
  check_cpu(packed, "packed");
  const at::Tensor p = packed.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  at::Tensor out = new_output({p.size(0), k}, s.options());
  cpu::dequantize(quant_matrix(p, s, z, k, bits, group_size), out.data_ptr(),
                  to_dtype(out.scalar_type()), TorchParallel());
  return out;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t bits, int64_t group_size,
                      const c10::optional<at::Tensor>& bias) {
  check_linear(meta_of(x), meta_of(packed), meta_of(scales), meta_of(zeros), bits, group_size,
               meta_of(bias));
  check_cpu(x, "x");
  const int64_t k = x.size(-1);
  const at::Tensor p = packed.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  at::Tensor x2 = x.reshape({-1, k});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  at::Tensor y = new_output({x2.size(0), p.size(0)}, x.options());
  cpu::linear(quant_matrix(p, s, z, k, bits, group_size),
              cpu::Activations{x2.data_ptr(), to_dtype(x2.scalar_type()), x2.size(0), x2.stride(0)},
              b.defined() ? b.data_ptr() : nullptr,
              b.defined() ? to_dtype(b.scalar_type()) : DType::kF32, y.data_ptr(),
              to_dtype(y.scalar_type()), TorchParallel());
  return y.view(linear_out_shape(x, p.size(0)));
}

// A tensor's metadata as the fake implementations pass it to the check_*
// functions: (dtype, shape, device), dtype a torch.dtype, shape a sequence of
// ints, device a string such as "cuda:0" or a torch.device.
using PyTensorMeta =
    std::tuple<at::ScalarType, std::vector<int64_t>, std::variant<std::string, at::Device>>;

// Borrows the shape held by `t`.
TensorMeta from_py(const PyTensorMeta& t) {
  const auto& device = std::get<2>(t);
  return TensorMeta{std::get<0>(t), std::get<1>(t),
                    device.index() == 0 ? at::Device(std::get<0>(device)) : std::get<1>(device)};
}

cpu::Isa isa_from_name(const std::string& name) {
  cpu::Isa isa;
  TORCH_CHECK_VALUE(cpu::parse_isa(name.c_str(), &isa), "lowbit: unknown CPU ISA '", name,
                    "'; choose scalar, avx2, avx512 or avx512emu");
  return isa;
}

}  // namespace
}  // namespace binding
}  // namespace lowbit

TORCH_LIBRARY(lowbit, m) {
  m.def("pack(Tensor codes, int bits) -> Tensor");
  m.def("unpack(Tensor packed, int bits, int in_features) -> Tensor");
  m.def("dequantize(Tensor packed, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor");
  m.def(
      "linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int bits, int group_size, "
      "Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  using namespace lowbit::binding;
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("linear", &linear_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using lowbit::cpu::Isa;
  m.doc() = "lowbit kernels (the ops themselves are in torch.ops.lowbit)";
  m.def("cpu_isa", [] { return std::string(lowbit::cpu::isa_name(lowbit::cpu::active_isa())); },
        "The CPU kernel variant in use.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        const Isa isa = lowbit::binding::isa_from_name(name);
        TORCH_CHECK_VALUE(lowbit::cpu::set_active_isa(isa), "lowbit: this CPU or build cannot run the '",
                          name, "' kernels");
      },
      "Forces a CPU kernel variant: 'scalar', 'avx2', 'avx512' or 'avx512emu'.");
  m.def(
      "supported_cpu_isas",
      [] {
        std::vector<std::string> names;
        for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Emulated}) {
          if (lowbit::cpu::isa_supported(isa)) names.emplace_back(lowbit::cpu::isa_name(isa));
        }
        return names;
      },
      "CPU kernel variants that this build and CPU can run.");
  m.def("cpu_exact_mode", [] { return lowbit::cpu::exact_mode(); },
        "Whether the CPU kernels keep x in fp32 for every number of rows.");
  m.def("set_cpu_exact_mode", [](bool exact) { lowbit::cpu::set_exact_mode(exact); },
        "True: fp32 activations everywhere; False: the integer path for few rows.");
  m.def(
      "cpu_linear_kernel",
      [](int64_t rows) {
        TORCH_CHECK_VALUE(rows >= 0, "lowbit: the number of rows must be >= 0, got ", rows);
        return std::string(lowbit::cpu::linear_kernel(rows));
      },
      "The CPU kernel linear runs for `rows` rows of x: 'amx-bf16', 'avx512-bf16', 'q8-gemv', "
      "'gemv' or 'gemm'.");
  m.def("cpu_bf16_mode", [] { return std::string(lowbit::cpu::bf16_gemm_mode()); },
        "The bf16 GEMM's mode: 'auto', 'avx512' or 'off'.");
  m.def(
      "set_cpu_bf16_mode",
      [](const std::string& name) {
        TORCH_CHECK_VALUE(lowbit::cpu::set_bf16_gemm_mode(name.c_str()), "lowbit: unknown bf16 mode '", name,
                          "'; expected 'auto', 'avx512' or 'off'");
      },
      "'auto': AMX tiles where usable; 'avx512': vdpbf16ps; 'off': never the bf16 GEMM.");
  m.def("cpu_amx_usable", [] { return lowbit::cpu::amx_usable(); },
        "Whether this CPU and OS let the process use AMX bf16 tiles.");
  m.def(
      "cuda_linear_path",
      [](int64_t rows, at::ScalarType dtype) {
        TORCH_CHECK_TYPE(lowbit::binding::is_float_dtype(dtype),
                         "lowbit: x must be float32, float16 or bfloat16, got ", dtype);
        TORCH_CHECK_VALUE(rows >= 0, "lowbit: the number of rows must be >= 0, got ", rows);
        const auto path = lowbit::binding::linear_path_for(rows, lowbit::binding::to_dtype(dtype));
        return std::string(lowbit::cuda::linear_path_name(path));
      },
      "The CUDA kernel that linear runs for `rows` rows of x of `dtype`.");
  m.def(
      "set_cuda_linear_path",
      [](const std::string& name) {
        const auto path = lowbit::binding::parse_linear_path_or_throw(name);
        lowbit::binding::forced_linear_path_slot().store(static_cast<int32_t>(path));
      },
      "Forces the CUDA linear kernel ('auto' restores the automatic choice).");
  m.def(
      "forced_cuda_linear_path",
      [] { return std::string(lowbit::cuda::linear_path_name(lowbit::binding::forced_linear_path())); },
      "The forced CUDA linear kernel, or 'auto'.");

  // The argument checks of the ops on tensor metadata, for the fake (meta)
  // implementations: the kernels run the same checks, so both fail alike.
  namespace py = pybind11;
  using lowbit::binding::from_py;
  using lowbit::binding::PyTensorMeta;
  m.def(
      "check_pack",
      [](const PyTensorMeta& codes, int64_t bits) {
        lowbit::binding::check_pack(from_py(codes), bits);
      },
      py::arg("codes"), py::arg("bits"), "Validates the arguments of lowbit::pack.");
  m.def(
      "check_unpack",
      [](const PyTensorMeta& packed, int64_t bits, int64_t in_features) {
        lowbit::binding::check_unpack(from_py(packed), bits, in_features);
      },
      py::arg("packed"), py::arg("bits"), py::arg("in_features"),
      "Validates the arguments of lowbit::unpack.");
  m.def(
      "in_features_of",
      [](const PyTensorMeta& packed, int64_t bits) {
        return lowbit::binding::in_features_of(from_py(packed), bits);
      },
      py::arg("packed"), py::arg("bits"),
      "The in_features of a 2-D packed weight of `bits` bits (checks bits and the rank only).");
  m.def(
      "check_dequantize",
      [](const PyTensorMeta& packed, const PyTensorMeta& scales, const PyTensorMeta& zeros,
         int64_t bits, int64_t group_size) {
        return lowbit::binding::check_dequantize(from_py(packed), from_py(scales), from_py(zeros),
                                                 bits, group_size);
      },
      py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("bits"),
      py::arg("group_size"), "Validates the arguments of lowbit::dequantize; returns in_features.");
  m.def(
      "check_linear",
      [](const PyTensorMeta& x, const PyTensorMeta& packed, const PyTensorMeta& scales,
         const PyTensorMeta& zeros, int64_t bits, int64_t group_size,
         const std::optional<PyTensorMeta>& bias) {
        lowbit::binding::check_linear(
            from_py(x), from_py(packed), from_py(scales), from_py(zeros), bits, group_size,
            bias ? std::optional<lowbit::binding::TensorMeta>(from_py(*bias)) : std::nullopt);
      },
      py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("bits"),
      py::arg("group_size"), py::arg("bias") = py::none(),
      "Validates the arguments of lowbit::linear (x's shape: only its rank and last size matter).");
  m.def("block_size", [] { return lowbit::kBlockCodes; },
        "Codes per packing block: in_features and group_size are multiples of it.");
  m.def(
      "supported_bits",
      [] {
        py::list widths;
        for (int bits = 1; bits <= 8; ++bits) {
          if (lowbit::is_supported_bits(bits)) widths.append(bits);
        }
        return py::tuple(widths);
      },
      "The bit widths the kernels support, ascending.");
  m.def("built_with_cuda", [] {
#if defined(LOWBIT_WITH_CUDA)
    return true;
#else
    return false;
#endif
  });
}
