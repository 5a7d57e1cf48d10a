// fp16/bf16 conversions: exhaustive over all 16-bit patterns, and rounding of
// random fp32 values against the compiler's own _Float16 where it has one.
#include <cmath>
#include <cstring>
#include <random>

#include "check.h"
#include "lowbit/half.h"

using namespace lowbit;

TEST(fp16_round_trips_every_value) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_float(uint16_t(h));
    if (std::isnan(f)) {
      CHECK((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0, "h=%x", h);
      continue;
    }
    CHECK(float_to_fp16(f) == h, "h=%x f=%g back=%x", h, f, float_to_fp16(f));
  }
}

TEST(bf16_round_trips_every_value) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_float(uint16_t(h));
    if (std::isnan(f)) continue;
    CHECK(float_to_bf16(f) == h, "h=%x", h);
  }
}

TEST(bf16_rounds_half_to_even) {
  // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);
  CHECK(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
}

#if defined(__FLT16_MAX__)
TEST(fp16_rounding_matches_the_compiler) {
  std::mt19937 rng(12345);
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t u = rng();
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    CHECK(float_to_fp16(f) == ref_bits, "f=%a", f);
  }
}
#endif

TEST_MAIN()
