// CPU entry points: instruction-set selection, activation preparation and
// threading. The arithmetic lives in the per-instruction-set variants.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"
#include "lowbit/cpu.h"
#include "lowbit/dispatch.h"
#include "lowbit/format.h"
#include "lowbit/q8.h"

namespace lowbit {
namespace cpu {
namespace {

// Adapts a lambda to the type-erased RangeFn of the Parallel interface.
template <class F>
void for_range(const Parallel& par, int64_t n, int64_t grain, F&& f) {
  RangeFn fn{&f, [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); }};
  par.for_range(n, grain, fn);
}

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if defined(LOWBIT_HAVE_AVX2)
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::kAvx512Emulated: return cpu_has(Isa::kAvx2);
#endif
#if defined(LOWBIT_HAVE_AVX512)
    case Isa::kAvx512:
      return cpu_has(Isa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
#endif
    default: return false;
  }
}

bool cpu_has_vnni() {
#if defined(LOWBIT_HAVE_AVX512)
  return cpu_has(Isa::kAvx512) && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The bf16 GEMM's instructions beyond the AVX-512 variant's (avx512_bf16.cpp).
bool cpu_has_bf16_gemm() {
#if defined(LOWBIT_HAVE_AVX512)
  return cpu_has(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

// Linux hands out the AMX tile state only to processes that ask for it
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); until then the
// first tile instruction faults. The permission covers every thread of the
// process, so it is asked once; a refusal (older kernel, seccomp, a
// hypervisor without AMX state) leaves the vector fallback.
bool tile_permission_granted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtileData = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
#else
  return false;
#endif
}

bool tiles_usable() {
#if defined(LOWBIT_HAVE_AVX512)
  static const bool usable = cpu_has_bf16_gemm() && __builtin_cpu_supports("amx-tile") &&
                             __builtin_cpu_supports("amx-bf16") && tile_permission_granted();
  return usable;
#else
  return false;
#endif
}

// The bf16 GEMM modes, by name; the index is the mode's value.
constexpr const char* kBf16ModeNames[] = {"auto", "avx512", "off"};
enum class Bf16Mode : int32_t { kAuto = 0, kAvx512 = 1, kOff = 2 };

bool parse_bf16_mode(const char* name, Bf16Mode* out) {
  constexpr int32_t kModes = sizeof(kBf16ModeNames) / sizeof(kBf16ModeNames[0]);
  for (int32_t i = 0; i < kModes; ++i) {
    if (std::strcmp(name, kBf16ModeNames[i]) == 0) {
      *out = static_cast<Bf16Mode>(i);
      return true;
    }
  }
  return false;
}

std::atomic<int32_t>& bf16_mode_slot() {
  static std::atomic<int32_t> slot{[] {
    const char* v = std::getenv("LOWBIT_CPU_BF16");
    Bf16Mode mode = Bf16Mode::kAuto;
    // An unknown name keeps the default; the Python layer reports it.
    if (v != nullptr && *v) parse_bf16_mode(v, &mode);
    return static_cast<int32_t>(mode);
  }()};
  return slot;
}

Bf16Mode current_bf16_mode() { return static_cast<Bf16Mode>(bf16_mode_slot().load()); }

Isa initial_isa() {
  const char* forced = std::getenv("LOWBIT_CPU_ISA");
  Isa isa;
  if (forced && *forced && parse_isa(forced, &isa) && cpu_has(isa)) return isa;
  // An unusable request falls back to the best variant; the Python layer
  // validates LOWBIT_CPU_ISA and reports the problem with a clear message.
  return best_supported_isa();
}

std::atomic<int32_t>& active_isa_slot() {
  static std::atomic<int32_t> slot{static_cast<int32_t>(initial_isa())};
  return slot;
}

LinearFn linear_for(Isa isa) {
  switch (isa) {
#if defined(LOWBIT_HAVE_AVX512)
    case Isa::kAvx512: return avx512::linear;
#endif
#if defined(LOWBIT_HAVE_AVX2)
    case Isa::kAvx2: return avx2::linear;
    case Isa::kAvx512Emulated: return avx2::linear_emulated16;
#endif
    default: return scalar::linear;
  }
}

// The integer path of a variant, or null where it has none (scalar). AVX-512
// CPUs without VNNI take the AVX2 one.
LinearQ8Fn linear_q8_for(Isa isa) {
  switch (isa) {
#if defined(LOWBIT_HAVE_AVX512)
    case Isa::kAvx512: return cpu_has_vnni() ? avx512vnni::linear_q8 : avx2::linear_q8;
#endif
#if defined(LOWBIT_HAVE_AVX2)
    case Isa::kAvx2: return avx2::linear_q8;
    case Isa::kAvx512Emulated: return avx2::linear_q8_emulated16;
#endif
    default: return nullptr;
  }
}

std::atomic<bool>& exact_mode_slot() {
  static std::atomic<bool> slot{[] {
    const char* v = std::getenv("LOWBIT_CPU_EXACT");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }()};
  return slot;
}

enum class Bf16Gemm { kNone, kVector, kTiles };

// The bf16 GEMM for m rows: outside exact mode, under the avx512 variant, on
// CPUs with AVX-512 BF16; with tiles in mode "auto" where AMX is usable, with
// vdpbf16ps in mode "avx512". Without AMX, "auto" keeps the int8 and fp32
// paths: on Sapphire Rapids vdpbf16ps is no faster than the fp32 FMAs of the
// GEMM (docs/KERNELS.md), so the bf16 rounding would buy nothing.
Bf16Gemm bf16_gemm(int64_t m) {
  if (m < kBf16MinRows || exact_mode() || active_isa() != Isa::kAvx512 || !cpu_has_bf16_gemm()) {
    return Bf16Gemm::kNone;
  }
  switch (current_bf16_mode()) {
    case Bf16Mode::kAuto: return tiles_usable() ? Bf16Gemm::kTiles : Bf16Gemm::kNone;
    case Bf16Mode::kAvx512: return Bf16Gemm::kVector;
    case Bf16Mode::kOff: break;
  }
  return Bf16Gemm::kNone;
}

// The integer path for m rows, or null when the fp32 kernels or the bf16 GEMM run.
LinearQ8Fn q8_path(int64_t m) {
  if (m > kQ8MaxRows || exact_mode() || bf16_gemm(m) != Bf16Gemm::kNone) return nullptr;
  return linear_q8_for(active_isa());
}

// x (m rows of k fp32 values, row stride `stride`) quantized by quantize_act_group.
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t stride, int8_t* q, float* scales) {
  const int64_t groups = k / kActGroup;
  for (int64_t mi = 0; mi < m; ++mi) {
    for (int64_t g = 0; g < groups; ++g) {
      scales[mi * groups + g] =
          quantize_act_group(x + mi * stride + g * kActGroup, q + mi * k + g * kActGroup);
    }
  }
}

constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Emulated};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Emulated: return "avx512emu";
    default: return "scalar";
  }
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : kAllIsas) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

bool isa_supported(Isa isa) { return cpu_has(isa); }

Isa best_supported_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (cpu_has(isa)) return isa;
  }
  return Isa::kScalar;
}

bool exact_mode() { return exact_mode_slot().load(); }

void set_exact_mode(bool exact) { exact_mode_slot().store(exact); }

const char* bf16_gemm_mode() { return kBf16ModeNames[bf16_mode_slot().load()]; }

bool set_bf16_gemm_mode(const char* name) {
  Bf16Mode mode;
  if (!parse_bf16_mode(name, &mode)) return false;
  bf16_mode_slot().store(static_cast<int32_t>(mode));
  return true;
}

bool amx_usable() { return tiles_usable(); }

const char* linear_kernel(int64_t m) {
  switch (bf16_gemm(m)) {
    case Bf16Gemm::kTiles: return "amx-bf16";
    case Bf16Gemm::kVector: return "avx512-bf16";
    case Bf16Gemm::kNone: break;
  }
  if (q8_path(m) != nullptr) return "q8-gemv";
  return m <= kGemvMaxRows ? "gemv" : "gemm";
}

Isa active_isa() { return static_cast<Isa>(active_isa_slot().load()); }

bool set_active_isa(Isa isa) {
  if (!cpu_has(isa)) return false;
  active_isa_slot().store(static_cast<int32_t>(isa));
  return true;
}

void pack(const uint8_t* codes, int64_t n, int64_t k, int bits, uint32_t* packed,
          const Parallel& par) {
  require_supported_bits(bits);
  const int64_t row_words = words_per_row(k, bits);
  for_range(par, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) pack_row(codes + r * k, k, bits, packed + r * row_words);
  });
}

void unpack(const uint32_t* packed, int64_t n, int64_t k, int bits, uint8_t* codes,
            const Parallel& par) {
  require_supported_bits(bits);
  const int64_t row_words = words_per_row(k, bits);
  for_range(par, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) unpack_row(packed + r * row_words, k, bits, codes + r * k);
  });
}

void dequantize(const QuantMatrix& w, void* out, DType out_dtype, const Parallel& par) {
  require_supported_bits(w.bits);
  const int64_t groups = w.groups();
  for_range(par, w.n, 16, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> codes(static_cast<size_t>(w.k));
    for (int64_t r = b; r < e; ++r) {
      unpack_row(w.packed + r * w.row_words(), w.k, w.bits, codes.data());
      for (int64_t g = 0; g < groups; ++g) {
        const float s = load_as_float(w.scales, w.scale_dtype, r * groups + g);
        const float z = load_as_float(w.zeros, w.scale_dtype, r * groups + g);
        for (int64_t i = g * w.group_size; i < (g + 1) * w.group_size; ++i) {
          store_from_float(out, out_dtype, r * w.k + i, s * (float(codes[i]) - z));
        }
      }
    }
  });
}

void linear(const QuantMatrix& w, const Activations& x, const void* bias, DType bias_dtype,
            void* y, DType y_dtype, const Parallel& par) {
  require_supported_bits(w.bits);  // before the variants, some of which take any width
  const int64_t k = w.k;
  // The variants read fp32 activations: use x in place when it already is.
  std::vector<float> x_f32;
  const float* xf = static_cast<const float*>(x.data);
  int64_t x_stride = x.stride;
  if (x.dtype != DType::kF32) {
    x_f32.resize(static_cast<size_t>(x.m * k));
    for_range(par, x.m, 4, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        for (int64_t i = 0; i < k; ++i) x_f32[m * k + i] = load_as_float(x.data, x.dtype, m * x.stride + i);
      }
    });
    xf = x_f32.data();
    x_stride = k;
  }

  // The variants write fp32; write straight into y when it is fp32 already.
  std::vector<float> y_f32;
  float* yf = static_cast<float*>(y);
  if (y_dtype != DType::kF32) {
    y_f32.resize(static_cast<size_t>(x.m * w.n));
    yf = y_f32.data();
  }
  const Bf16Gemm bf16 = bf16_gemm(x.m);
  if (bf16 != Bf16Gemm::kNone) {
#if defined(LOWBIT_HAVE_AVX512)
    bf16::linear(w, xf, x.m, x_stride, yf, bf16 == Bf16Gemm::kTiles, par);
#endif
  } else if (const LinearQ8Fn q8 = q8_path(x.m)) {
    std::vector<int8_t> xq(static_cast<size_t>(x.m * k));
    std::vector<float> xd(static_cast<size_t>(x.m * (k / kActGroup)));
    quantize_rows(xf, x.m, k, x_stride, xq.data(), xd.data());
    q8(w, Q8Rows{xq.data(), xd.data(), x.m}, yf, par);
  } else {
    linear_for(active_isa())(w, xf, x.m, x_stride, yf, par);
  }
  if (bias == nullptr && y_dtype == DType::kF32) return;
  for_range(par, x.m * w.n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float v = yf[i];
      if (bias) v += load_as_float(bias, bias_dtype, i % w.n);
      store_from_float(y, y_dtype, i, v);
    }
  });
}

}  // namespace cpu
}  // namespace lowbit
