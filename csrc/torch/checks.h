// Argument validation shared by the CPU and CUDA bindings of the lowbit ops
// and, through lowbit._C.check_* (ops.cpp), by their fake (meta)
// implementations in lowbit/kernels/ops.py: the checks read only a tensor's
// metadata, so real and fake tensors fail alike, with these messages.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>
#include <optional>

#include "lowbit/format.h"
#include "lowbit/half.h"
#include "lowbit/matrix.h"

namespace lowbit {
namespace binding {

inline void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(is_supported_bits(static_cast<int>(bits)),
                    "lowbit: bits must be 2, 3 or 4, got ", bits);
}

inline void check_in_features(int64_t k) {
  TORCH_CHECK_VALUE(k > 0 && k % kBlockCodes == 0,
                    "lowbit: in_features must be a positive multiple of 32, got ", k);
}

inline void check_group_size(int64_t group_size, int64_t k) {
  TORCH_CHECK_VALUE(group_size > 0 && group_size % kBlockCodes == 0 && k % group_size == 0,
                    "lowbit: group_size must be a multiple of 32 that divides in_features (",
                    k, "), got ", group_size);
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline DType to_dtype(at::ScalarType t) {
  return t == at::kHalf ? DType::kF16 : t == at::kBFloat16 ? DType::kBF16 : DType::kF32;
}

// What the checks read of a tensor: its dtype, sizes and device. Built from a
// real tensor by the bindings, or from Python by the fake implementations.
// `sizes` is borrowed: its owner must outlive the check.
struct TensorMeta {
  at::ScalarType dtype;
  at::IntArrayRef sizes;
  at::Device device;

  int64_t dim() const { return static_cast<int64_t>(sizes.size()); }
  int64_t size(int64_t d) const { return sizes[static_cast<size_t>(d < 0 ? d + dim() : d)]; }
};

inline TensorMeta meta_of(const at::Tensor& t) {
  return TensorMeta{t.scalar_type(), t.sizes(), t.device()};
}

inline std::optional<TensorMeta> meta_of(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<TensorMeta>(meta_of(*t)) : std::nullopt;
}

// codes[out_features, in_features], uint8, for packing to `bits` bits.
inline void check_pack(const TensorMeta& codes, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK_TYPE(codes.dtype == at::kByte, "lowbit: codes must be uint8, got ", codes.dtype);
  TORCH_CHECK_VALUE(codes.dim() == 2, "lowbit: codes must be 2-D [out_features, in_features], got ",
                    codes.sizes);
  check_in_features(codes.size(1));
}

// Every code below 2^bits (a reduction and one value read back: packing is
// offline). Needs the values, so the bindings check it, not the fakes.
inline void check_code_values(const at::Tensor& c, int64_t bits) {
  TORCH_CHECK_VALUE(c.numel() == 0 || c.max().item<uint8_t>() < (1 << bits),
                    "lowbit: codes must be below 2^bits = ", 1 << bits);
}

// The kernel cores' view of a validated weight (see check_weight).
inline QuantMatrix quant_matrix(const at::Tensor& packed, const at::Tensor& scales,
                                const at::Tensor& zeros, int64_t k, int64_t bits, int64_t group_size) {
  return QuantMatrix{reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()),
                     scales.data_ptr(),
                     zeros.data_ptr(),
                     to_dtype(scales.scalar_type()),
                     packed.size(0),
                     k,
                     static_cast<int>(bits),
                     group_size};
}

inline void check_packed(const TensorMeta& packed, int64_t k, int64_t bits) {
  TORCH_CHECK_TYPE(packed.dtype == at::kInt, "lowbit: packed must be int32, got ", packed.dtype);
  TORCH_CHECK_VALUE(packed.dim() == 2 && packed.size(1) == words_per_row(k, bits),
                    "lowbit: packed must have shape [out_features, ", words_per_row(k, bits),
                    "] for in_features=", k, " and bits=", bits, ", got ", packed.sizes);
}

inline void check_unpack(const TensorMeta& packed, int64_t bits, int64_t in_features) {
  check_bits(bits);
  check_in_features(in_features);
  check_packed(packed, in_features, bits);
}

// in_features is not stored anywhere else: it follows from packed's width.
inline int64_t in_features_of(const TensorMeta& packed, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK_VALUE(packed.dim() == 2, "lowbit: packed must be 2-D, got ", packed.sizes);
  return packed.size(1) / bits * kBlockCodes;
}

// Validates a quantized weight W[n, k] given the in_features k it is used with.
inline void check_weight(const TensorMeta& packed, const TensorMeta& scales,
                         const TensorMeta& zeros, int64_t k, int64_t bits, int64_t group_size) {
  check_bits(bits);
  check_in_features(k);
  check_group_size(group_size, k);
  check_packed(packed, k, bits);
  const int64_t n = packed.size(0);
  TORCH_CHECK_TYPE(is_float_dtype(scales.dtype),
                   "lowbit: scales must be float32, float16 or bfloat16, got ", scales.dtype);
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == k / group_size,
                    "lowbit: scales must have shape [", n, ", ", k / group_size, "], got ",
                    scales.sizes);
  TORCH_CHECK_TYPE(zeros.dtype == scales.dtype, "lowbit: zeros must have the dtype of scales (",
                   scales.dtype, "), got ", zeros.dtype);
  TORCH_CHECK_VALUE(zeros.sizes == scales.sizes, "lowbit: zeros must have shape ", scales.sizes,
                    " like scales, got ", zeros.sizes);
  TORCH_CHECK(scales.device == packed.device && zeros.device == packed.device,
              "lowbit: packed, scales and zeros must be on one device, got ", packed.device, ", ",
              scales.device, ", ", zeros.device);
}

// Returns in_features.
inline int64_t check_dequantize(const TensorMeta& packed, const TensorMeta& scales,
                                const TensorMeta& zeros, int64_t bits, int64_t group_size) {
  const int64_t k = in_features_of(packed, bits);
  check_weight(packed, scales, zeros, k, bits, group_size);
  return k;
}

inline void check_linear(const TensorMeta& x, const TensorMeta& packed, const TensorMeta& scales,
                         const TensorMeta& zeros, int64_t bits, int64_t group_size,
                         const std::optional<TensorMeta>& bias) {
  TORCH_CHECK_TYPE(is_float_dtype(x.dtype), "lowbit: x must be float32, float16 or bfloat16, got ",
                   x.dtype);
  TORCH_CHECK_VALUE(x.dim() >= 1, "lowbit: x must have at least one dimension");
  check_weight(packed, scales, zeros, x.size(-1), bits, group_size);
  TORCH_CHECK(x.device == packed.device, "lowbit: x is on ", x.device, " but the weight is on ",
              packed.device);
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(is_float_dtype(bias->dtype),
                     "lowbit: bias must be float32, float16 or bfloat16, got ", bias->dtype);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == packed.size(0),
                      "lowbit: bias must have shape [", packed.size(0), "], got ", bias->sizes);
    TORCH_CHECK(bias->device == packed.device, "lowbit: bias is on ", bias->device,
                " but the weight is on ", packed.device);
  }
}

// Outputs of every op come from here. With LOWBIT_POISON_OUTPUTS=1 (the test
// suite sets it) they start as NaN (or all-ones bits), so a kernel that leaves
// any element unwritten fails the comparison with the reference.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* v = std::getenv("LOWBIT_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  at::Tensor out = at::empty(sizes, options);
  if (poison) {
    if (out.is_floating_point()) {
      out.fill_(std::numeric_limits<float>::quiet_NaN());
    } else {
      out.fill_(-1);
    }
  }
  return out;
}

inline std::vector<int64_t> linear_out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

}  // namespace binding
}  // namespace lowbit
