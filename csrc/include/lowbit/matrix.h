// The description of one packed weight that every kernel core takes, CPU and
// CUDA alike: plain pointers and sizes, no torch types.
#pragma once

#include <cstdint>

#include "lowbit/format.h"
#include "lowbit/half.h"

namespace lowbit {

// One packed weight W[n, k] in the canonical layout (docs/FORMAT.md), in host
// memory for the CPU kernels and in device memory for the CUDA ones.
struct QuantMatrix {
  const uint32_t* packed;  // [n, words_per_row(k, bits)], rows contiguous
  const void* scales;      // [n, k / group_size], contiguous
  const void* zeros;       // same shape and dtype as scales
  DType scale_dtype;
  int64_t n;
  int64_t k;
  int bits;
  int64_t group_size;

  LOWBIT_HD int64_t groups() const { return k / group_size; }
  LOWBIT_HD int64_t row_words() const { return words_per_row(k, bits); }
};

}  // namespace lowbit
