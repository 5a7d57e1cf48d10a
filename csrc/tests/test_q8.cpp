// The 8-bit quantization of activations (lowbit/q8.h) that the integer CPU
// path multiplies with: range, rounding, error bound and non-finite groups.
#include <cmath>
#include <algorithm>
#include <cstdlib>
#include <random>
#include <vector>

#include "check.h"
#include "lowbit/q8.h"

using namespace lowbit;

TEST(codes_span_the_range_and_round_to_nearest) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> x(kActGroup);
  std::vector<int8_t> q(kActGroup);
  for (int trial = 0; trial < 200; ++trial) {
    for (auto& v : x) v = normal(rng) * (trial % 7 == 0 ? 1e-30f : 1.0f);
    const float d = quantize_act_group(x.data(), q.data());
    int qmax = 0;
    for (int i = 0; i < kActGroup; ++i) {
      CHECK(q[i] != -128);  // symmetric: |q| <= 127
      qmax = std::max(qmax, std::abs(int(q[i])));
      // round to nearest: within half a step of x / d (in the arithmetic the kernel uses)
      CHECK(std::fabs(x[i] / d - q[i]) <= 0.5f, "trial=%d i=%d x/d=%g q=%d", trial, i, x[i] / d, q[i]);
    }
    CHECK(qmax == 127, "trial=%d: the largest |x| maps to 127, got %d", trial, qmax);
  }
}

TEST(zero_group_has_zero_scale_and_codes) {
  std::vector<float> x(kActGroup, 0.0f);
  std::vector<int8_t> q(kActGroup, 9);
  CHECK(quantize_act_group(x.data(), q.data()) == 0.0f);
  for (int8_t v : q) CHECK(v == 0);
}

TEST(non_finite_group_gives_nan_scale) {
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    std::vector<float> x(kActGroup, 1.0f);
    std::vector<int8_t> q(kActGroup, 9);
    x[7] = bad;
    CHECK(std::isnan(quantize_act_group(x.data(), q.data())));
    for (int8_t v : q) CHECK(v == 0);
  }
}

TEST_MAIN()
