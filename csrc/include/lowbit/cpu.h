// The torch-free CPU kernel API: plain pointers, sizes and strides. The torch
// binding (csrc/torch) and the C++ tests (csrc/tests) are its only callers.
#pragma once

#include <cstdint>

#include "lowbit/half.h"
#include "lowbit/matrix.h"

namespace lowbit {
namespace cpu {

// Kernel variants. scalar < avx2 < avx512 in order of preference;
// avx512emu runs the 16-lane algorithm of the avx512 variant on pairs of AVX2
// registers, so that CPUs without AVX-512 can test it. It is never chosen
// automatically, only when forced.
enum class Isa : int32_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Emulated = 3 };

const char* isa_name(Isa isa);
// Parses "scalar", "avx2", "avx512" or "avx512emu"; returns false for anything else.
bool parse_isa(const char* name, Isa* out);
// The best variant this CPU (and this build) can run.
Isa best_supported_isa();
bool isa_supported(Isa isa);
// The variant the kernels use: best_supported_isa() unless forced, either by
// the LOWBIT_CPU_ISA environment variable at load time or by set_active_isa.
Isa active_isa();
// Returns false (and changes nothing) if this CPU cannot run `isa`.
bool set_active_isa(Isa isa);

// Products with few activation rows (decoding) take an integer path where the
// variant has one (avx2, avx512, avx512emu): x is quantized to int8 in groups
// of 32 (lowbit/q8.h) and multiplied with integer dot products, within the
// error bound of docs/KERNELS.md. Exact mode keeps x in fp32 everywhere. Set
// by LOWBIT_CPU_EXACT=1 at load time or by set_exact_mode.
bool exact_mode();
void set_exact_mode(bool exact);
// From kBf16MinRows (csrc/cpu/kernels.h) rows on, outside exact mode, the
// avx512 variant can multiply in bf16 (CPUs with AVX-512 BF16): weights
// decoded to bf16 panels, x rounded to bf16, fp32 accumulation. The mode says
// with what: "auto" (the default) with AMX tiles where the CPU has them and
// Linux grants their use, else not at all; "avx512" with vdpbf16ps (also
// where AMX is usable: for comparisons and for testing); "off": never. Set by
// LOWBIT_CPU_BF16 at load time or by set_bf16_gemm_mode, which returns false
// (and changes nothing) for any other name.
const char* bf16_gemm_mode();
bool set_bf16_gemm_mode(const char* name);
// Whether this CPU and OS let this process use AMX bf16 tiles (asks Linux
// for the permission on first call).
bool amx_usable();
// The kernel cpu::linear runs for m activation rows under the active variant
// and mode: "amx-bf16" or "avx512-bf16" (bf16 GEMM), "q8-gemv" (integer),
// "gemv" or "gemm" (fp32).
const char* linear_kernel(int64_t m);

// Runs body(begin, end) over disjoint chunks covering [0, n), possibly in
// parallel. The torch binding maps this onto at::parallel_for.
struct RangeFn {
  void* ctx;
  void (*call)(void* ctx, int64_t begin, int64_t end);
  void operator()(int64_t b, int64_t e) const { call(ctx, b, e); }
};
struct Parallel {
  virtual void for_range(int64_t n, int64_t grain, RangeFn fn) const = 0;
  virtual ~Parallel() = default;
};
// Runs everything on the calling thread.
struct Serial final : Parallel {
  void for_range(int64_t n, int64_t, RangeFn fn) const override {
    if (n > 0) fn(0, n);
  }
};

using lowbit::QuantMatrix;

// Activations x[m, k] (row stride x_stride elements, unit column stride).
struct Activations {
  const void* data;
  DType dtype;
  int64_t m;
  int64_t stride;
};

// Each of these throws std::invalid_argument for a `bits` other than 2, 3 or 4.

// codes[n, k] (uint8, each < 2^bits) -> packed[n, words_per_row(k, bits)].
void pack(const uint8_t* codes, int64_t n, int64_t k, int bits, uint32_t* packed,
          const Parallel& par);
// packed -> codes[n, k].
void unpack(const uint32_t* packed, int64_t n, int64_t k, int bits, uint8_t* codes,
            const Parallel& par);
// W = scales * (codes - zeros), written as out[n, k] in `out_dtype`.
void dequantize(const QuantMatrix& w, void* out, DType out_dtype, const Parallel& par);
// y[m, n] = x @ W^T (+ bias[n]), accumulated in fp32, stored in `y_dtype`
// with row stride n. `bias` may be null.
void linear(const QuantMatrix& w, const Activations& x, const void* bias, DType bias_dtype,
            void* y, DType y_dtype, const Parallel& par);

}  // namespace cpu
}  // namespace lowbit
