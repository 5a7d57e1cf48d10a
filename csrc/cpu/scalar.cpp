// Portable kernel variant: plain C++, for CPUs without AVX2 and as the
// simplest correct implementation to compare the vector variants with.
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "lowbit/format.h"

namespace lowbit {
namespace cpu {
namespace scalar {

void linear_rows(const QuantMatrix& w, const PreparedX& x, int64_t n0, int64_t n1, float* y) {
  const int64_t k = w.k;
  const int64_t groups = w.groups();
  std::vector<uint8_t> codes(static_cast<size_t>(k));
  std::vector<float> acc(static_cast<size_t>(x.m));
  for (int64_t n = n0; n < n1; ++n) {
    unpack_row(w.packed + n * w.row_words(), k, w.bits, codes.data());
    for (auto& a : acc) a = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = load_as_float(w.scales, w.scale_dtype, n * groups + g);
      const float offset = -s * load_as_float(w.zeros, w.scale_dtype, n * groups + g);
      const uint8_t* q = codes.data() + g * w.group_size;
      for (int64_t m = 0; m < x.m; ++m) {
        const float* xg = x.x + m * k + g * w.group_size;
        float dot = 0.0f;
        for (int64_t i = 0; i < w.group_size; ++i) dot += float(q[i]) * xg[i];
        acc[m] += s * dot + offset * x.xsum[m * groups + g];
      }
    }
    for (int64_t m = 0; m < x.m; ++m) y[m * w.n + n] = acc[m];
  }
}

}  // namespace scalar
}  // namespace cpu
}  // namespace lowbit
