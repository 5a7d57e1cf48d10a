// Bit-exact conversions between fp32 and the 16-bit float formats, with
// round-to-nearest-even, usable from host and device code.
#pragma once

#include <cstdint>
#include <cstring>

#include "lowbit/format.h"

namespace lowbit {

// Scalar types of the data a kernel reads or writes.
enum class DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

LOWBIT_HD int dtype_size(DType t) { return t == DType::kF32 ? 4 : 2; }

LOWBIT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

LOWBIT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

LOWBIT_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

LOWBIT_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

LOWBIT_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // Subnormal: the value is mant * 2^-24, exactly representable in fp32.
  const float v = float(mant) * bits_float(0x33800000u);
  return sign ? -v : v;
}

LOWBIT_HD uint16_t float_to_fp16(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= 0x47800000u) {  // |f| >= 65536 (or inf/NaN): saturates to inf after rounding
    return uint16_t(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));
  }
  if (u < 0x38800000u) {  // below fp16's smallest normal: let fp32 addition round
    const float half = 0.5f;  // 2^-1: aligns the fp16 subnormal lsb with fp32's lsb
    const uint32_t r = float_bits(bits_float(u) + half) - float_bits(half);
    return uint16_t(sign | r);
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // rebias the exponent by -112 and round half to even
  return uint16_t(sign | (u >> 13));
}

LOWBIT_HD float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kBF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

LOWBIT_HD void store_from_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kF16: static_cast<uint16_t*>(p)[i] = float_to_fp16(v); break;
    case DType::kBF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

}  // namespace lowbit
