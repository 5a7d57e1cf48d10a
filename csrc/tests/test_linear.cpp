// cpu::linear and cpu::dequantize of every kernel variant this CPU runs,
// against a double-precision reference computed here from the codes, with
// outputs poisoned beforehand so that unwritten elements are caught.
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "check.h"
#include "../cpu/kernels.h"
#include "lowbit/cpu.h"
#include "lowbit/format.h"
#include "lowbit/q8.h"

using namespace lowbit;

namespace {

// Splits work into chunks of `grain`, run in reverse order on this thread, so
// that chunk boundaries are exercised deterministically.
struct ReverseChunks final : cpu::Parallel {
  void for_range(int64_t n, int64_t grain, cpu::RangeFn fn) const override {
    if (grain < 1) grain = 1;
    for (int64_t b = (n - 1) / grain * grain; b >= 0; b -= grain) fn(b, std::min(n, b + grain));
  }
};

struct Buffer {  // values of one dtype, with their fp32 originals (after rounding)
  std::vector<uint8_t> bytes;
  std::vector<double> values;
  DType dtype;
  Buffer(int64_t count, DType t) : bytes(count * dtype_size(t)), values(count), dtype(t) {}
  void set(int64_t i, float v) {
    store_from_float(bytes.data(), dtype, i, v);
    values[i] = load_as_float(bytes.data(), dtype, i);
  }
  void poison() {
    for (int64_t i = 0; i < int64_t(values.size()); ++i) {
      store_from_float(bytes.data(), dtype, i, std::numeric_limits<float>::quiet_NaN());
    }
  }
  double get(int64_t i) const { return load_as_float(bytes.data(), dtype, i); }
};

struct Case {
  int64_t m, n, k, g;
  int bits;
  DType x_dtype, scale_dtype;
  bool bias;
  int64_t x_stride;  // >= k: rows of x may be padded
};

// x as the integer path sees it: d * q of each group of 32 (lowbit/q8.h).
std::vector<double> q8_values(const std::vector<double>& x, int64_t m, int64_t k, int64_t stride) {
  std::vector<double> out(x);
  std::vector<float> group(kActGroup);
  std::vector<int8_t> q(kActGroup);
  for (int64_t mi = 0; mi < m; ++mi) {
    for (int64_t g = 0; g < k; g += kActGroup) {
      for (int i = 0; i < kActGroup; ++i) group[i] = float(x[mi * stride + g + i]);
      const float d = quantize_act_group(group.data(), q.data());
      for (int i = 0; i < kActGroup; ++i) out[mi * stride + g + i] = double(d) * q[i];
    }
  }
  return out;
}

double to_bf16(double v) { return bf16_to_float(float_to_bf16(float(v))); }

bool is_bf16_gemm(const std::string& kernel) { return kernel == "amx-bf16" || kernel == "avx512-bf16"; }

// fp32 rounding of the sums; the bf16 GEMM's tiles sum in another order.
double tolerance(DType out, bool bf16) {
  if (out != DType::kF32) return 1e-2;
  return bf16 ? 1e-4 : 1e-5;
}

void run_case(const Case& c, std::mt19937& rng) {
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t groups = c.k / c.g;
  std::vector<uint8_t> codes(c.n * c.k);
  for (auto& q : codes) q = uint8_t(rng() % (1u << c.bits));
  std::vector<uint32_t> packed(c.n * words_per_row(c.k, c.bits));
  cpu::pack(codes.data(), c.n, c.k, c.bits, packed.data(), cpu::Serial());
  Buffer scales(c.n * groups, c.scale_dtype), zeros(c.n * groups, c.scale_dtype);
  for (int64_t i = 0; i < c.n * groups; ++i) {
    scales.set(i, 0.01f + 0.09f * uni(rng));
    zeros.set(i, uni(rng) * float((1 << c.bits) - 1));
  }
  Buffer x(c.m * c.x_stride, c.x_dtype), bias(c.n, c.scale_dtype), y(c.m * c.n, c.x_dtype);
  for (int64_t i = 0; i < c.m * c.x_stride; ++i) x.set(i, normal(rng));
  for (int64_t i = 0; i < c.n; ++i) bias.set(i, normal(rng));
  y.poison();

  const cpu::QuantMatrix w{packed.data(), scales.bytes.data(), zeros.bytes.data(), c.scale_dtype,
                           c.n, c.k, c.bits, c.g};
  // The integer path multiplies x as its 8-bit quantization, the bf16 GEMM x
  // and W rounded to bf16: so does the reference.
  const std::string kernel = cpu::linear_kernel(c.m);
  const bool bf16 = is_bf16_gemm(kernel);
  if (kernel == "q8-gemv") x.values = q8_values(x.values, c.m, c.k, c.x_stride);
  if (bf16) {
    for (double& v : x.values) v = to_bf16(v);
  }
  cpu::linear(w, cpu::Activations{x.bytes.data(), c.x_dtype, c.m, c.x_stride},
              c.bias ? bias.bytes.data() : nullptr, c.scale_dtype, y.bytes.data(), c.x_dtype,
              ReverseChunks());

  double err = 0.0, ref_norm = 0.0;
  for (int64_t mi = 0; mi < c.m; ++mi) {
    for (int64_t ni = 0; ni < c.n; ++ni) {
      double ref = c.bias ? bias.values[ni] : 0.0;
      for (int64_t ki = 0; ki < c.k; ++ki) {
        const int64_t gi = ni * groups + ki / c.g;
        double wv = scales.values[gi] * (codes[ni * c.k + ki] - zeros.values[gi]);
        // the bf16 GEMM rounds the fp32 weight (q - z) * s, as cpu::dequantize computes it
        if (bf16) wv = to_bf16((float(codes[ni * c.k + ki]) - float(zeros.values[gi])) * float(scales.values[gi]));
        ref += x.values[mi * c.x_stride + ki] * wv;
      }
      const double d = y.get(mi * c.n + ni) - ref;
      err += std::isnan(d) ? std::numeric_limits<double>::infinity() : d * d;
      ref_norm += ref * ref;
    }
  }
  const double rel = std::sqrt(err / ref_norm);
  CHECK(rel < tolerance(c.x_dtype, bf16), "isa=%s kernel=%s m=%ld n=%ld k=%ld g=%ld bits=%d x=%d s=%d bias=%d rel=%g",
        cpu::isa_name(cpu::active_isa()), cpu::linear_kernel(c.m), long(c.m), long(c.n), long(c.k), long(c.g), c.bits,
        int(c.x_dtype), int(c.scale_dtype), int(c.bias), rel);
}

// A variant this CPU runs, in exact mode or not, in a bf16 GEMM mode.
struct Kernels {
  cpu::Isa isa;
  bool exact;
  const char* bf16;
  void use() const {
    CHECK(cpu::set_active_isa(isa) && cpu::active_isa() == isa);
    cpu::set_exact_mode(exact);
    CHECK(cpu::set_bf16_gemm_mode(bf16));
  }
};

// Outside exact mode the avx512 variant also runs in bf16 modes "avx512"
// (vdpbf16ps) and "off", so that every kernel it may take is tested.
std::vector<Kernels> runnable_kernels() {
  std::vector<Kernels> all;
  for (cpu::Isa isa : {cpu::Isa::kScalar, cpu::Isa::kAvx2, cpu::Isa::kAvx512,
                       cpu::Isa::kAvx512Emulated}) {
    if (!cpu::isa_supported(isa)) continue;
    all.push_back({isa, false, "auto"});
    if (isa == cpu::Isa::kAvx512) {
      all.push_back({isa, false, "avx512"});
      all.push_back({isa, false, "off"});
    }
    all.push_back({isa, true, "auto"});
  }
  return all;
}

void restore_default_kernels() {
  cpu::set_exact_mode(false);
  cpu::set_bf16_gemm_mode("auto");
  cpu::set_active_isa(cpu::best_supported_isa());
}

// In-features for a group size (0: per-channel): 576 and 1536 (SmolLM2-135M)
// and sizes that leave partial super-blocks and chunks in every variant.
std::vector<int64_t> in_features_for(int64_t g) {
  switch (g) {
    case 32: return {32, 96, 576, 1536};
    case 64: return {64, 576, 1536};
    case 128: return {128, 384, 1536};
    default: return {32, 96, 576, 1536};
  }
}

}  // namespace

// Every variant, bits, activation rows (GEMV and GEMM paths), group size and
// in-features, with odd out-features, mixed dtypes, bias or not, padded rows.
TEST(linear_matches_reference_for_every_variant) {
  std::mt19937 rng(2024);
  const DType dtypes[] = {DType::kF32, DType::kF16, DType::kBF16};
  int count = 0;
  for (const Kernels& kernels : runnable_kernels()) {
    kernels.use();
    for (int bits : {2, 3, 4}) {
      for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 16, 17, 33, 128, 129}) {
        for (int64_t g : {32, 64, 128, 0}) {
          const std::vector<int64_t> ks = in_features_for(g);
          const int64_t k = ks[rng() % ks.size()];
          const int64_t n = m >= 33 ? int64_t(2 * (rng() % 8) + 1) : int64_t(2 * (rng() % 24) + 1);
          const Case c{m, n, k, g == 0 ? k : g, bits, dtypes[count % 3], dtypes[(count / 3) % 3],
                       rng() % 2 == 0, rng() % 3 == 0 ? k + 8 : k};
          run_case(c, rng);
          ++count;
        }
      }
    }
  }
  restore_default_kernels();
}

// The shapes of SmolLM2-135M's projections, fp32, through the GEMV and the GEMM.
TEST(linear_matches_reference_at_model_shapes) {
  std::mt19937 rng(7);
  for (const Kernels& kernels : runnable_kernels()) {
    kernels.use();
    for (int bits : {2, 3, 4}) {
      for (const auto& nk : {std::pair<int64_t, int64_t>{1536, 576}, {576, 1536}}) {
        for (int64_t m : {1, 16}) {
          run_case(Case{m, nk.first, nk.second, 64, bits, DType::kF32, DType::kF16, true, nk.second},
                   rng);
        }
      }
    }
  }
  restore_default_kernels();
}

// The bf16 GEMM where it runs: every width and group size, partial panels
// (odd out-features over several panels), partial blocks of activation rows,
// more rows than one pass, and in-features that are odd multiples of 32.
TEST(bf16_gemm_matches_reference_on_bf16_rounded_inputs) {
  std::mt19937 rng(16);
  int count = 0;
  for (const Kernels& kernels : runnable_kernels()) {
    kernels.use();
    if (!is_bf16_gemm(cpu::linear_kernel(16))) continue;
    for (int bits : {2, 3, 4}) {
      for (int64_t m : {12, 16, 17, 33, 64, 128, 129, 300}) {
        for (int64_t g : {32, 64, 128, 0}) {
          const std::vector<int64_t> ks = in_features_for(g);
          const int64_t k = ks[rng() % ks.size()];
          const int64_t n = m > 129 ? 33 : int64_t(2 * (rng() % 40) + 1);
          run_case(Case{m, n, k, g == 0 ? k : g, bits, DType::kF32, DType::kF16, count % 2 == 0,
                        count % 3 == 0 ? k + 8 : k},
                   rng);
          ++count;
        }
      }
    }
  }
  restore_default_kernels();
}

TEST(integer_path_runs_for_few_rows_outside_exact_mode) {
  for (const Kernels& kernels : runnable_kernels()) {
    kernels.use();
    const bool q8 = !kernels.exact && kernels.isa != cpu::Isa::kScalar;
    for (int64_t m : {1, 2, 3, 4}) {
      CHECK(std::string(cpu::linear_kernel(m)) == (q8 ? "q8-gemv" : "gemv"), "isa=%s exact=%d m=%ld",
            cpu::isa_name(kernels.isa), int(kernels.exact), long(m));
    }
    const std::string many = cpu::linear_kernel(1000);
    CHECK(many == "gemm" || (!kernels.exact && kernels.isa == cpu::Isa::kAvx512 && is_bf16_gemm(many)),
          "isa=%s exact=%d bf16=%s kernel=%s", cpu::isa_name(kernels.isa), int(kernels.exact), kernels.bf16,
          many.c_str());
  }
  restore_default_kernels();
}

// Mode "auto" takes AMX where usable and otherwise keeps the int8 and fp32
// kernels; "avx512" takes vdpbf16ps; "off", exact mode and the other variants
// never take either; unknown modes are refused.
TEST(bf16_gemm_selection) {
  for (const Kernels& kernels : runnable_kernels()) {
    kernels.use();
    const std::string first = cpu::linear_kernel(cpu::kBf16MinRows);
    const bool avx512 = !kernels.exact && kernels.isa == cpu::Isa::kAvx512;
    const bool has_bf16 = avx512 && std::string(kernels.bf16) == "avx512" && is_bf16_gemm(first);
    if (!avx512 || std::string(kernels.bf16) == "off") {
      CHECK(!is_bf16_gemm(first) && !is_bf16_gemm(cpu::linear_kernel(128)), "isa=%s exact=%d bf16=%s",
            cpu::isa_name(kernels.isa), int(kernels.exact), kernels.bf16);
    } else if (std::string(kernels.bf16) == "auto") {
      CHECK(first == (cpu::amx_usable() ? "amx-bf16" : "q8-gemv"), "%s", first.c_str());
    } else if (has_bf16) {
      CHECK(first == "avx512-bf16");
    }
    if (avx512) CHECK(std::string(cpu::linear_kernel(cpu::kBf16MinRows - 1)) == "q8-gemv");
  }
  CHECK(!cpu::set_bf16_gemm_mode("amx") && std::string(cpu::bf16_gemm_mode()) == "auto");
  restore_default_kernels();
}

TEST(dequantize_matches_reference) {
  std::mt19937 rng(99);
  for (int bits : {2, 3, 4}) {
    const int64_t n = 5, k = 128, g = 32, groups = k / g;
    std::vector<uint8_t> codes(n * k);
    for (auto& q : codes) q = uint8_t(rng() % (1u << bits));
    std::vector<uint32_t> packed(n * words_per_row(k, bits));
    cpu::pack(codes.data(), n, k, bits, packed.data(), cpu::Serial());
    std::vector<float> scales(n * groups), zeros(n * groups), out(n * k, std::nanf(""));
    for (int64_t i = 0; i < n * groups; ++i) {
      scales[i] = 0.5f + float(rng() % 100) / 100.0f;
      zeros[i] = float(rng() % 1000) / 300.0f;
    }
    const cpu::QuantMatrix w{packed.data(), scales.data(), zeros.data(), DType::kF32, n, k, bits, g};
    cpu::dequantize(w, out.data(), DType::kF32, ReverseChunks());
    for (int64_t i = 0; i < n * k; ++i) {
      const int64_t gi = i / k * groups + (i % k) / g;
      CHECK(out[i] == scales[gi] * (float(codes[i]) - zeros[gi]), "bits=%d i=%ld", bits, long(i));
    }
  }
}

TEST(isa_selection_rejects_what_the_cpu_lacks) {
  cpu::Isa isa;
  CHECK(cpu::parse_isa("avx2", &isa) && isa == cpu::Isa::kAvx2);
  CHECK(!cpu::parse_isa("sse9", &isa));
  CHECK(cpu::isa_supported(cpu::Isa::kScalar));
  CHECK(cpu::set_active_isa(cpu::Isa::kScalar) && cpu::active_isa() == cpu::Isa::kScalar);
  for (cpu::Isa other : {cpu::Isa::kAvx2, cpu::Isa::kAvx512, cpu::Isa::kAvx512Emulated}) {
    CHECK(cpu::set_active_isa(other) == cpu::isa_supported(other));
  }
  cpu::set_active_isa(cpu::best_supported_isa());
}

TEST_MAIN()
