// The vector kernels of cpu::linear, written once over a small SIMD
// abstraction `V` and compiled once per instruction set: avx2.cpp (8 lanes,
// plus 16 lanes emulated with pairs of AVX2 registers) and avx512.cpp
// (16 lanes). Each includes this file after switching the compile target,
// with LOWBIT_SIMD_NAMESPACE naming its own namespace, so that no inline
// function exists for two targets under one name. Everything this file needs
// from the standard library must be included by the includer before the target
// switch; nothing here instantiates a standard-library template.
//
// `V` provides, for kLanes fp32 lanes (F) and as many 32-bit integer lanes (I):
//   zero, set1, load, store, add, mul, fmadd, sum (horizontal), load_i,
//   bcast32 / bcast64 (4 / 8 unaligned bytes repeated over the lanes),
//   and_, u32_to_float (exact for the masked code fields below),
//   load_f16, load_bf16 (kLanes 16-bit floats to fp32), and
//   kGemmRows (weight rows per GEMM micro-tile).
//
// Decoding. Codes are never shifted into place: a word (or a pair of words)
// is broadcast to every lane, each lane keeps one field with its own mask,
// and the masked integer, q * 2^shift, is converted to float as it stands.
// The activations are pre-scaled once per call by 2^-shift (exact: a power of
// two), so the product with the weight is exactly q * x. This costs two
// vector operations per kLanes codes (AND and convert) before the FMA.

#if !defined(LOWBIT_SIMD_NAMESPACE)
#error "define LOWBIT_SIMD_NAMESPACE before including simd_linear.h"
#endif

namespace lowbit {
namespace cpu {
namespace LOWBIT_SIMD_NAMESPACE {

constexpr int64_t kBlock = kBlockCodes;  // codes per block: every group is whole blocks

// An aligned fp32 work buffer (plain malloc: no standard template is
// instantiated under this file's target).
class Scratch {
 public:
  explicit Scratch(int64_t floats) {
    const size_t bytes = (static_cast<size_t>(floats > 0 ? floats : 1) * 4 + 63) / 64 * 64;
    data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  ~Scratch() { std::free(data_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* get() const { return data_; }

 private:
  float* data_;
};

template <class Fn>
void for_range(const Parallel& par, int64_t n, int64_t grain, Fn&& fn) {
  RangeFn range{&fn, [](void* ctx, int64_t b, int64_t e) { (*static_cast<Fn*>(ctx))(b, e); }};
  par.for_range(n, grain, range);
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Where the codes of one block (32 codes) of a plane of PB-bit fields land in
// the L lanes of the block's 32 / L vectors. Vector v of a block reads a
// broadcast at byte_offset(v) (8 bytes for 4-bit planes, else 4), and lane l
// keeps the field at bit shift(l), which holds code(v, l) of the block.
//   2-bit: 16 codes a word; each broadcast serves L consecutive codes.
//   1-bit: 32 codes a word; likewise.
//   4-bit: 8 codes a word; a broadcast of two words serves the same L/2
//          nibbles of both, even lanes from the first word, odd from the
//          second, so the codes are permuted within the block.
// With 8 lanes every field lies below bit 16 of its broadcast, so a signed
// int32 conversion is exact; 16 lanes use the whole word and need an unsigned
// one. A broadcast may read up to 3 bytes past its block: only the last row of
// a matrix needs padding (see PaddedLastRow).
template <int L, int PB>
struct Plane {
  static_assert(L == 8 || L == 16, "8 or 16 lanes");
  static_assert(PB == 1 || PB == 2 || PB == 4, "1-, 2- or 4-bit fields");
  static constexpr int kVectors = kBlockCodes / L;
  static constexpr int kBlockBytes = 4 * PB;
  static constexpr bool kWide = PB == 4;
  static constexpr int kPerPair = 16 / L;  // 4-bit: vectors per pair of words

  static constexpr int shift(int l) { return PB == 4 ? 4 * (l >> 1) : PB * l; }
  static constexpr int byte_offset(int v) {
    return PB == 4 ? 8 * (v / kPerPair) + (L / 4) * (v % kPerPair) : v * L * PB / 8;
  }
  static constexpr int code(int v, int l) {
    return PB == 4 ? 8 * (2 * (v / kPerPair) + (l & 1)) + (L / 2) * (v % kPerPair) + (l >> 1)
                   : v * L + l;
  }
  static constexpr uint32_t mask(int l) { return ((1u << PB) - 1u) << shift(l); }
  static float lane_scale(int l) { return bits_float(uint32_t(127 - shift(l)) << 23); }
};

template <class V, int PB>
using PlaneOf = Plane<V::kLanes, PB>;

// The masks of a plane, one per lane (the same for every vector of a block).
template <class V, class P>
typename V::I plane_masks() {
  alignas(64) int32_t m[V::kLanes];
  for (int l = 0; l < V::kLanes; ++l) m[l] = static_cast<int32_t>(P::mask(l));
  return V::load_i(m);
}

// The per-lane factors 2^-shift(l) of a plane, times `extra`.
template <class V, class P>
typename V::F plane_scales(float extra) {
  alignas(64) float s[V::kLanes];
  for (int l = 0; l < V::kLanes; ++l) s[l] = extra * P::lane_scale(l);
  return V::load(s);
}

// q * 2^shift for the lanes of vector v of the block at `block`.
template <class V, class P>
inline typename V::F decode(const uint8_t* block, int v, typename V::I mask) {
  const uint8_t* p = block + P::byte_offset(v);
  const typename V::I raw = P::kWide ? V::bcast64(p) : V::bcast32(p);
  return V::u32_to_float(V::and_(raw, mask));
}

// count values of dtype t starting at src[i0], to fp32.
template <class V>
void to_float(const void* src, DType t, int64_t i0, int64_t count, float* dst) {
  constexpr int L = V::kLanes;
  int64_t i = 0;
  if (t == DType::kF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + i0;
    for (; i + L <= count; i += L) V::store(dst + i, V::load_f16(s + i));
  } else if (t == DType::kBF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + i0;
    for (; i + L <= count; i += L) V::store(dst + i, V::load_bf16(s + i));
  }
  for (; i < count; ++i) dst[i] = load_as_float(src, t, i0 + i);
}

// Row-pointer source for the kernels: the packed rows of w, except that the
// last row is read from a padded copy, because broadcasts read up to 3 bytes
// past the end of a row.
class PaddedLastRow {
 public:
  explicit PaddedLastRow(const QuantMatrix& w)
      : w_(w), bytes_(w.row_words() * 4), copy_(w.row_words() + 4) {
    std::memcpy(copy_.get(), w.packed + (w.n - 1) * w.row_words(), static_cast<size_t>(bytes_));
    std::memset(reinterpret_cast<uint8_t*>(copy_.get()) + bytes_, 0, 16);
  }
  const uint8_t* row(int64_t n) const {
    if (n == w_.n - 1) return reinterpret_cast<const uint8_t*>(copy_.get());
    return reinterpret_cast<const uint8_t*>(w_.packed) + n * bytes_;
  }

 private:
  const QuantMatrix& w_;
  int64_t bytes_;
  Scratch copy_;
};

// Byte offset of the 1-bit plane of a 3-bit row.
inline int64_t high_plane_bytes(int64_t k) { return high_plane_offset(k) * 4; }

// ------------------------------------------------------------------------------------------
// GEMV (few activation rows): y[m][n] = sum_g s[n][g] * dot(q[n][g], x[m][g])
//                                       - sum_g s[n][g] * z[n][g] * xsum[m][g]
// R weight rows at a time share each activation load, MB activation rows share
// each decoded weight vector.

// Activations for the GEMV: pre-scaled copies in the lane order of the low
// plane (and, for 3 bits, of the 1-bit plane, times 4), and group sums.
struct GemvX {
  const float* lo;   // [m][k]
  const float* hi;   // [m][k], 3-bit only
  const float* sum;  // [m][groups]
};

template <class V, class P>
void prescale_row(const float* x, int64_t k, float extra, float* out) {
  constexpr int L = V::kLanes;
  if (P::code(1, 0) == L && P::code(0, 1) == 1) {  // codes in order: scale whole vectors
    const typename V::F scale = plane_scales<V, P>(extra);
    for (int64_t i = 0; i < k; i += L) V::store(out + i, V::mul(V::load(x + i), scale));
    return;
  }
  for (int64_t b = 0; b < k; b += kBlock) {
    for (int v = 0; v < P::kVectors; ++v) {
      for (int l = 0; l < L; ++l) {
        out[b + v * L + l] = x[b + P::code(v, l)] * (extra * P::lane_scale(l));
      }
    }
  }
}

template <class V, int kBits>
void prepare_gemv_x(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, float* lo,
                    float* hi, float* sum) {
  const int64_t k = w.k, groups = w.groups();
  for (int64_t mi = 0; mi < m; ++mi) {
    const float* xr = x + mi * stride;
    prescale_row<V, PlaneOf<V, low_plane_bits(kBits)>>(xr, k, 1.0f, lo + mi * k);
    if (kBits == 3) prescale_row<V, PlaneOf<V, 1>>(xr, k, 4.0f, hi + mi * k);
    for (int64_t g = 0; g < groups; ++g) {
      typename V::F acc = V::zero();
      for (int64_t i = g * w.group_size; i < (g + 1) * w.group_size; i += V::kLanes) {
        acc = V::add(acc, V::load(xr + i));
      }
      sum[mi * groups + g] = V::sum(acc);
    }
  }
}

// Scales of rows [n, n + r) as fp32, [r][groups], and each row's zero term for
// activation rows [m0, m0 + mb): offset[r][mb] = -sum_g s * z * xsum[m][g].
template <class V>
void row_scales(const QuantMatrix& w, const GemvX& x, int64_t n, int r, int64_t m0, int mb,
                float* scales, float* zeros, float* offsets) {
  constexpr int L = V::kLanes;
  const int64_t groups = w.groups();
  for (int i = 0; i < r; ++i) {
    float* s = scales + i * groups;
    to_float<V>(w.scales, w.scale_dtype, (n + i) * groups, groups, s);
    to_float<V>(w.zeros, w.scale_dtype, (n + i) * groups, groups, zeros);
    for (int j = 0; j < mb; ++j) {
      const float* xs = x.sum + (m0 + j) * groups;
      typename V::F acc = V::zero();
      int64_t g = 0;
      for (; g + L <= groups; g += L) {
        acc = V::fmadd(V::mul(V::load(s + g), V::load(zeros + g)), V::load(xs + g), acc);
      }
      float total = V::sum(acc);
      for (; g < groups; ++g) total += s[g] * zeros[g] * xs[g];
      offsets[i * mb + j] = -total;
    }
  }
}

template <class V, int kBits, int R, int MB>
void gemv_tile(const QuantMatrix& w, const GemvX& x, int64_t m0, const uint8_t* const* rows,
               const float* scales, const float* offsets, int64_t n0, float* y) {
  using F = typename V::F;
  using Lo = PlaneOf<V, low_plane_bits(kBits)>;
  using Hi = PlaneOf<V, 1>;
  constexpr int L = V::kLanes;
  const int64_t k = w.k, groups = w.groups(), blocks_per_group = w.group_size / kBlock;
  const int64_t hi_bytes = high_plane_bytes(k);
  const typename V::I lo_mask = plane_masks<V, Lo>();
  const typename V::I hi_mask = plane_masks<V, Hi>();
  const float* xlo = x.lo + m0 * k;
  const float* xhi = x.hi + m0 * k;

  F acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = V::zero();

  for (int64_t g = 0; g < groups; ++g) {
    F dot[R][MB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) dot[r][j] = V::zero();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
#pragma GCC unroll 4
      for (int v = 0; v < Lo::kVectors; ++v) {
        F xv[MB];
        for (int j = 0; j < MB; ++j) xv[j] = V::load(xlo + j * k + b * kBlock + v * L);
        for (int r = 0; r < R; ++r) {
          const F q = decode<V, Lo>(rows[r] + b * Lo::kBlockBytes, v, lo_mask);
          for (int j = 0; j < MB; ++j) dot[r][j] = V::fmadd(q, xv[j], dot[r][j]);
        }
      }
      if (kBits == 3) {
#pragma GCC unroll 4
        for (int v = 0; v < Hi::kVectors; ++v) {
          F xv[MB];
          for (int j = 0; j < MB; ++j) xv[j] = V::load(xhi + j * k + b * kBlock + v * L);
          for (int r = 0; r < R; ++r) {
            const F q = decode<V, Hi>(rows[r] + hi_bytes + b * Hi::kBlockBytes, v, hi_mask);
            for (int j = 0; j < MB; ++j) dot[r][j] = V::fmadd(q, xv[j], dot[r][j]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const F s = V::set1(scales[r * groups + g]);
      for (int j = 0; j < MB; ++j) acc[r][j] = V::fmadd(dot[r][j], s, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) y[(m0 + j) * w.n + n0 + r] = V::sum(acc[r][j]) + offsets[r * MB + j];
}

// Rows [nb, ne) for activation rows [m0, m0 + MB), R rows at a time.
template <class V, int kBits, int R, int MB>
void gemv_rows(const QuantMatrix& w, const GemvX& x, const PaddedLastRow& rows, int64_t m0,
               int64_t nb, int64_t ne, float* y) {
  const int64_t groups = w.groups();
  Scratch buf(R * groups + groups + R * MB);
  float* scales = buf.get();
  float* zeros = scales + R * groups;
  float* offsets = zeros + groups;
  int64_t n = nb;
  for (; n + R <= ne; n += R) {
    const uint8_t* ptrs[R];
    for (int r = 0; r < R; ++r) ptrs[r] = rows.row(n + r);
    row_scales<V>(w, x, n, R, m0, MB, scales, zeros, offsets);
    gemv_tile<V, kBits, R, MB>(w, x, m0, ptrs, scales, offsets, n, y);
  }
  for (; n < ne; ++n) {
    const uint8_t* ptr = rows.row(n);
    row_scales<V>(w, x, n, 1, m0, MB, scales, zeros, offsets);
    gemv_tile<V, kBits, 1, MB>(w, x, m0, &ptr, scales, offsets, n, y);
  }
}

// Activation rows up to which the GEMV beats decoding to fp32 for the GEMM.
constexpr int64_t kGemvMaxRows = 4;

template <class V, int kBits>
void gemv(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, float* y,
          const Parallel& par) {
  Scratch lo(m * w.k), hi(kBits == 3 ? m * w.k : 1), sum(m * w.groups());
  prepare_gemv_x<V, kBits>(w, x, m, stride, lo.get(), hi.get(), sum.get());
  const GemvX gx{lo.get(), hi.get(), sum.get()};
  const PaddedLastRow rows(w);
  for_range(par, w.n, 16, [&](int64_t nb, int64_t ne) {
    switch (m) {
      case 1: gemv_rows<V, kBits, 4, 1>(w, gx, rows, 0, nb, ne, y); break;
      case 2: gemv_rows<V, kBits, 2, 2>(w, gx, rows, 0, nb, ne, y); break;
      case 3: gemv_rows<V, kBits, 1, 3>(w, gx, rows, 0, nb, ne, y); break;
      default: gemv_rows<V, kBits, 1, 4>(w, gx, rows, 0, nb, ne, y); break;
    }
  });
}

// ------------------------------------------------------------------------------------------
// GEMM (more activation rows): weight rows are decoded, kGemmRows at a time
// and kChunk codes at a time, into an fp32 panel in L1; a register-blocked
// micro-kernel multiplies it with the transposed activations xt[k][m] of that
// chunk (in L2), kGemmRows x (2 vectors of m) outputs at a time. Decoding costs
// about as much as 1/M of the multiplications.

constexpr int64_t kChunk = 256;  // codes of K per panel (multiple of kBlock)

// xt[kk][mi] = x[mi][code(kk)] in the lane order of the low plane (for 3 bits
// the 1-bit plane has the same order), zero for the padding mi >= m.
template <class V, int kBits>
void prepare_gemm_x(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, int64_t mp,
                    float* xt, const Parallel& par) {
  using Lo = PlaneOf<V, low_plane_bits(kBits)>;
  constexpr int L = V::kLanes;
  for_range(par, w.k / kBlock, 8, [&](int64_t bb, int64_t be) {
    for (int64_t b = bb; b < be; ++b) {
      for (int v = 0; v < Lo::kVectors; ++v) {
        for (int l = 0; l < L; ++l) {
          float* dst = xt + (b * kBlock + v * L + l) * mp;
          const float* src = x + b * kBlock + Lo::code(v, l);
          for (int64_t mi = 0; mi < m; ++mi) dst[mi] = src[mi * stride];
          for (int64_t mi = m; mi < mp; ++mi) dst[mi] = 0.0f;
        }
      }
    }
  });
}

// panel[r][kk] = W[n + r][code(kk)] for the codes of blocks [b0, b1) (zero for
// rows past the end), fully dequantized: s * q - s * z.
template <class V, int kBits>
void decode_panel(const QuantMatrix& w, const PaddedLastRow& rows, int64_t n, int64_t b0,
                  int64_t b1, float* panel) {
  using F = typename V::F;
  using Lo = PlaneOf<V, low_plane_bits(kBits)>;
  using Hi = PlaneOf<V, 1>;
  constexpr int L = V::kLanes;
  const int64_t width = (b1 - b0) * kBlock, groups = w.groups();
  const int64_t blocks_per_group = w.group_size / kBlock, hi_bytes = high_plane_bytes(w.k);
  const typename V::I lo_mask = plane_masks<V, Lo>();
  const typename V::I hi_mask = plane_masks<V, Hi>();
  const F lo_lanes = plane_scales<V, Lo>(1.0f);
  const F hi_lanes = plane_scales<V, Hi>(4.0f);
  for (int r = 0; r < V::kGemmRows; ++r) {
    float* out = panel + r * width;
    if (n + r >= w.n) {
      for (int64_t i = 0; i < width; ++i) out[i] = 0.0f;
      continue;
    }
    const uint8_t* row = rows.row(n + r);
    int64_t group = -1;
    F s_lo = V::zero(), s_hi = V::zero(), offset = V::zero();
    for (int64_t b = b0; b < b1; ++b) {
      if (b / blocks_per_group != group) {
        group = b / blocks_per_group;
        const float s = load_as_float(w.scales, w.scale_dtype, (n + r) * groups + group);
        const float z = load_as_float(w.zeros, w.scale_dtype, (n + r) * groups + group);
        s_lo = V::mul(V::set1(s), lo_lanes);
        s_hi = V::mul(V::set1(s), hi_lanes);
        offset = V::set1(-s * z);
      }
      float* dst = out + (b - b0) * kBlock;
#pragma GCC unroll 4
      for (int v = 0; v < Lo::kVectors; ++v) {
        F wv = V::fmadd(decode<V, Lo>(row + b * Lo::kBlockBytes, v, lo_mask), s_lo, offset);
        if (kBits == 3) {
          wv = V::fmadd(decode<V, Hi>(row + hi_bytes + b * Hi::kBlockBytes, v, hi_mask), s_hi, wv);
        }
        V::store(dst + v * L, wv);
      }
    }
  }
}

// c[r][j*L + lane] (+)= sum_kk panel[r][kk] * xt[kk][j*L + lane], r < kGemmRows, j < NV.
template <class V, int NV>
void micro_kernel(const float* panel, int64_t width, const float* xt, int64_t mp, float* c,
                  bool accumulate) {
  using F = typename V::F;
  constexpr int R = V::kGemmRows, L = V::kLanes;
  F acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = accumulate ? V::load(c + r * mp + j * L) : V::zero();
  for (int64_t kk = 0; kk < width; ++kk) {
    F b[NV];
    for (int j = 0; j < NV; ++j) b[j] = V::load(xt + kk * mp + j * L);
    for (int r = 0; r < R; ++r) {
      const F a = V::set1(panel[r * width + kk]);
      for (int j = 0; j < NV; ++j) acc[r][j] = V::fmadd(a, b[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) V::store(c + r * mp + j * L, acc[r][j]);
}

template <class V, int kBits>
void gemm(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, float* y,
          const Parallel& par) {
  constexpr int L = V::kLanes, R = V::kGemmRows;
  const int64_t mp = round_up(m, L), panels = (w.n + R - 1) / R, blocks = w.k / kBlock;
  const int64_t chunk_blocks = kChunk / kBlock;
  Scratch xt(w.k * mp), yt(panels * R * mp);
  prepare_gemm_x<V, kBits>(w, x, m, stride, mp, xt.get(), par);
  const PaddedLastRow rows(w);
  for_range(par, panels, 1, [&](int64_t pb, int64_t pe) {
    Scratch panel(R * kChunk);
    // K outermost: the chunk of xt stays in L2 while every panel of this range uses it.
    for (int64_t b0 = 0; b0 < blocks; b0 += chunk_blocks) {
      const int64_t b1 = min64(blocks, b0 + chunk_blocks), width = (b1 - b0) * kBlock;
      const float* xt_chunk = xt.get() + b0 * kBlock * mp;
      for (int64_t p = pb; p < pe; ++p) {
        decode_panel<V, kBits>(w, rows, p * R, b0, b1, panel.get());
        float* c = yt.get() + p * R * mp;
        int64_t m0 = 0;
        for (; m0 + 2 * L <= mp; m0 += 2 * L) {
          micro_kernel<V, 2>(panel.get(), width, xt_chunk + m0, mp, c + m0, b0 > 0);
        }
        if (m0 < mp) micro_kernel<V, 1>(panel.get(), width, xt_chunk + m0, mp, c + m0, b0 > 0);
      }
    }
    for (int64_t p = pb; p < pe; ++p) {
      for (int64_t n = p * R; n < min64(w.n, (p + 1) * R); ++n) {
        for (int64_t mi = 0; mi < m; ++mi) y[mi * w.n + n] = yt.get()[n * mp + mi];
      }
    }
  });
}

template <class V, int kBits>
void linear_bits(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, float* y,
                 const Parallel& par) {
  if (m <= kGemvMaxRows) {
    gemv<V, kBits>(w, x, m, stride, y, par);
  } else {
    gemm<V, kBits>(w, x, m, stride, y, par);
  }
}

template <class V>
void linear_simd(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, float* y,
                 const Parallel& par) {
  if (m == 0 || w.n == 0) return;
  switch (w.bits) {
    case 2: linear_bits<V, 2>(w, x, m, stride, y, par); break;
    case 3: linear_bits<V, 3>(w, x, m, stride, y, par); break;
    default: linear_bits<V, 4>(w, x, m, stride, y, par); break;
  }
}

}  // namespace LOWBIT_SIMD_NAMESPACE
}  // namespace cpu
}  // namespace lowbit
