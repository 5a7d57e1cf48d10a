// The 8-bit quantization of activations that the integer CPU kernels use
// (docs/KERNELS.md): x is cut into groups of 32 consecutive inputs, and each
// group becomes int8 codes q (|q| <= 127) and one fp32 scale d = max|x| / 127,
// with x ~ d * q and q = round-half-even(x / d). Shared by the kernels and
// their tests; `lowbit.kernels.reference.quantize_activations` is the same
// arithmetic in torch, bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "lowbit/format.h"

namespace lowbit {

constexpr int kActGroup = 32;  // one scale per 32 inputs (a multiple of 32 is every K)

// x[0, 32) -> q[0, 32); returns d. A group holding NaN or Inf returns NaN
// (with q = 0), so the product is NaN, as the fp32 path's would be.
LOWBIT_HD float quantize_act_group(const float* x, int8_t* q) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < kActGroup; ++i) {
    const float a = fabsf(x[i]);
    finite = finite && a <= 3.402823466e38f;  // false for NaN and Inf
    amax = a > amax ? a : amax;
  }
  const float d = finite ? amax / 127.0f : NAN;
  for (int i = 0; i < kActGroup; ++i) q[i] = d > 0.0f ? static_cast<int8_t>(rintf(x[i] / d)) : 0;
  return d;
}

}  // namespace lowbit
