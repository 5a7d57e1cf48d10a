// dispatch_bits: each supported width reaches its own instantiation; any other
// width is an error, never a silent fallback to 4 bits.
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "lowbit/cpu.h"
#include "lowbit/dispatch.h"

using namespace lowbit;

TEST(supported_widths_dispatch_to_their_own_instantiation) {
  for (int bits : {2, 3, 4}) {
    const int seen = dispatch_bits(bits, [](auto b) { return decltype(b)::value; });
    CHECK(seen == bits, "bits=%d dispatched to %d", bits, seen);
  }
  int calls = 0;
  dispatch_bits(3, [&](auto b) { calls += decltype(b)::value; });  // void callables too
  CHECK(calls == 3);
}

TEST(unsupported_widths_throw_without_calling) {
  for (int bits : {0, 1, 5, 8, -4}) {
    bool called = false, threw = false;
    try {
      dispatch_bits(bits, [&](auto) { called = true; });
    } catch (const std::invalid_argument& e) {
      threw = true;
      const std::string expected = "lowbit: bits must be 2, 3 or 4, got " + std::to_string(bits);
      CHECK(e.what() == expected, "message: %s", e.what());
    }
    CHECK(threw && !called, "bits=%d", bits);
  }
}

// The CPU entry points reject other widths before any work, in every variant
// (the scalar one reads the width at run time, the vector ones dispatch on it).
TEST(cpu_entry_points_reject_unsupported_widths) {
  const int64_t n = 2, k = 64;
  std::vector<uint8_t> codes(n * k, 1);
  std::vector<uint32_t> packed(n * k, 0);  // room for any width up to 32 bits
  std::vector<float> scales(n * 2, 1.0f), zeros(n * 2, 0.0f), x(k, 1.0f), out(n * k, NAN);
  auto throws = [](auto&& call) {
    try {
      call();
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  for (cpu::Isa isa : {cpu::Isa::kScalar, cpu::Isa::kAvx2, cpu::Isa::kAvx512,
                       cpu::Isa::kAvx512Emulated}) {
    if (!cpu::set_active_isa(isa)) continue;
    for (int bits : {0, 1, 5}) {
      const cpu::QuantMatrix w{packed.data(), scales.data(), zeros.data(), DType::kF32, n, k,
                               bits, 32};
      CHECK(throws([&] { cpu::pack(codes.data(), n, k, bits, packed.data(), cpu::Serial()); }));
      CHECK(throws([&] { cpu::unpack(packed.data(), n, k, bits, codes.data(), cpu::Serial()); }));
      CHECK(throws([&] { cpu::dequantize(w, out.data(), DType::kF32, cpu::Serial()); }));
      for (int64_t m : {1, 8}) {  // the GEMV and GEMM paths
        CHECK(throws([&] {
                cpu::linear(w, cpu::Activations{x.data(), DType::kF32, m, 0}, nullptr, DType::kF32,
                            out.data(), DType::kF32, cpu::Serial());
              }),
              "isa=%s bits=%d m=%ld", cpu::isa_name(isa), bits, long(m));
      }
    }
  }
  for (uint8_t c : codes) CHECK(c == 1);
  for (uint32_t word : packed) CHECK(word == 0);
  for (float v : out) CHECK(std::isnan(v));
  cpu::set_active_isa(cpu::best_supported_isa());
}

TEST_MAIN()
