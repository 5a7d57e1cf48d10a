// Portable kernel variant: plain C++, for CPUs without AVX2 and as the
// simplest correct implementation to compare the vector variants with.
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "lowbit/format.h"

namespace lowbit {
namespace cpu {
namespace scalar {
namespace {

template <class F>
void for_range(const Parallel& par, int64_t n, int64_t grain, F&& f) {
  RangeFn fn{&f, [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); }};
  par.for_range(n, grain, fn);
}

// The sum of each quantization group of x, xsum[m][groups], so that the zero
// point costs one multiply-add per group instead of one per weight:
//   y[m][n] = sum_g s[n][g] * dot(q[n][g], x[m][g]) - s[n][g] * z[n][g] * xsum[m][g]
std::vector<float> group_sums(const QuantMatrix& w, const float* x, int64_t m, int64_t stride) {
  const int64_t groups = w.groups();
  std::vector<float> xsum(static_cast<size_t>(m * groups));
  for (int64_t mi = 0; mi < m; ++mi) {
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t i = g * w.group_size; i < (g + 1) * w.group_size; ++i) s += x[mi * stride + i];
      xsum[mi * groups + g] = s;
    }
  }
  return xsum;
}

}  // namespace

void linear(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, float* y,
            const Parallel& par) {
  const int64_t k = w.k;
  const int64_t groups = w.groups();
  const std::vector<float> xsum = group_sums(w, x, m, stride);
  for_range(par, w.n, 16, [&](int64_t n0, int64_t n1) {
    std::vector<uint8_t> codes(static_cast<size_t>(k));
    std::vector<float> acc(static_cast<size_t>(m));
    for (int64_t n = n0; n < n1; ++n) {
      unpack_row(w.packed + n * w.row_words(), k, w.bits, codes.data());
      for (auto& a : acc) a = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = load_as_float(w.scales, w.scale_dtype, n * groups + g);
        const float offset = -s * load_as_float(w.zeros, w.scale_dtype, n * groups + g);
        const uint8_t* q = codes.data() + g * w.group_size;
        for (int64_t mi = 0; mi < m; ++mi) {
          const float* xg = x + mi * stride + g * w.group_size;
          float dot = 0.0f;
          for (int64_t i = 0; i < w.group_size; ++i) dot += float(q[i]) * xg[i];
          acc[mi] += s * dot + offset * xsum[mi * groups + g];
        }
      }
      for (int64_t mi = 0; mi < m; ++mi) y[mi * w.n + n] = acc[mi];
    }
  });
}

}  // namespace scalar
}  // namespace cpu
}  // namespace lowbit
