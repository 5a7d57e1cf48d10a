// The one place that turns a run-time bit width into a compile-time one, for
// every kernel that is specialised per width (CPU and CUDA alike), and the
// one error for an unsupported width. Torch-free; host code only (dispatch
// happens before a launch), but safe to include in .cu files.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "lowbit/format.h"

namespace lowbit {

static_assert(is_supported_bits(2) && is_supported_bits(3) && is_supported_bits(4) &&
                  !is_supported_bits(1) && !is_supported_bits(5),
              "dispatch_bits covers exactly the widths of format.h");

template <int B>
using Bits = std::integral_constant<int, B>;

[[noreturn]] inline void throw_unsupported_bits(int bits) {
  throw std::invalid_argument("lowbit: bits must be 2, 3 or 4, got " + std::to_string(bits));
}

// Returns f(Bits<bits>{}); f reads the width as `decltype(b)::value`. An
// unsupported width throws std::invalid_argument: never a fallback to another
// width, which would misread the packed rows.
template <class F>
auto dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 2: return f(Bits<2>{});
    case 3: return f(Bits<3>{});
    case 4: return f(Bits<4>{});
  }
  throw_unsupported_bits(bits);
}

// The same error up front, for the entry points of the kernel cores: some
// kernels take the width at run time and would misread any other width.
inline void require_supported_bits(int bits) {
  if (!is_supported_bits(bits)) throw_unsupported_bits(bits);
}

}  // namespace lowbit
