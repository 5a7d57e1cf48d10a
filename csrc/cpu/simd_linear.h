// The vector kernels of cpu::linear, written once over a small SIMD
// abstraction `V` and compiled once per instruction set: avx2.cpp (8 lanes,
// plus 16 lanes emulated with pairs of AVX2 registers) and avx512.cpp
// (16 lanes). Each includes this file after switching the compile target,
// with LOWBIT_SIMD_NAMESPACE naming its own namespace, so that no inline
// function exists for two targets under one name. Everything this file needs
// from the standard library (and lowbit/dispatch.h, whose error path builds a
// std::string) must be included by the includer before the target switch;
// nothing here instantiates a standard-library function template.
//
// `V` provides, for kLanes fp32 lanes (F) and as many int32 lanes (I):
//   zero, set1, load, store, add, mul, fmadd, sum (horizontal),
//   load_f16/load_bf16 and their _partial forms (the first `count` values),
//   load_i (kLanes words), load_i_partial (the first `count` words, the other
//   lanes zero; tail super-blocks), srli16, spread_pairs (lane l gets the 16 bits of word l / 2
//   that start at bit 16 * (l % 2)), to_float (int32 -> fp32), permute (lane l
//   gets lane idx[l]), and kGemmRows (weight rows per GEMM micro-tile).
//   simd_q8_gemv.h adds the integer operations it lists.
//
// Decoding ("a lane is a word"). A super-block is kLanes consecutive words of
// a plane; lane l holds word l. Vector j of the super-block masks the same
// field j of every word, so lane l holds code l * F + j (F codes per word),
// as the integer q * 2^shift(j); it is converted to float as it stands. Fields
// in the upper half of a word are read from the word shifted right by 16, so
// every masked value is below 2^16 and converts exactly. The activations are
// permuted to the same order and pre-scaled by 2^-shift(j) once per call
// (exact: a power of two), so each product is exactly q * x. Cost: an AND and
// a conversion per kLanes codes before the FMA, and no broadcasts, which are
// slow on some x86 cores. A lane covers at most 16 codes, so it lies in one
// quantization group; the group scales are permuted to the lanes once per
// super-block.

#if !defined(LOWBIT_SIMD_NAMESPACE)
#error "define LOWBIT_SIMD_NAMESPACE before including simd_linear.h"
#endif

namespace lowbit {
namespace cpu {
namespace LOWBIT_SIMD_NAMESPACE {

#include "simd_util.h"

// Field j of the words of a plane of PB-bit fields, for L lanes. PB = 1 is the
// high-bit plane of 3-bit rows after spread_pairs: 16 fields per lane, each a
// code of the matching 2-bit super-block.
template <int L, int PB>
struct Plane {
  static_assert(PB == 1 || PB == 2 || PB == 4, "1-, 2- or 4-bit fields");
  static constexpr int kPerLane = PB == 1 ? 16 : 32 / PB;          // codes a lane holds
  static constexpr int kPerHalf = PB == 1 ? 16 : kPerLane / 2;     // fields below bit 16
  static constexpr int kCodes = L * kPerLane;                       // codes a super-block holds
  static constexpr int shift(int j) { return PB * (j % kPerHalf); }
  static constexpr uint32_t mask(int j) { return ((1u << PB) - 1u) << shift(j); }
  static constexpr int code(int j, int l) { return l * kPerLane + j; }
  static float scale(int j) { return bits_float(uint32_t(127 - shift(j)) << 23); }  // 2^-shift
};

template <class V, int kBits>
using LowPlane = Plane<V::kLanes, low_plane_bits(kBits)>;
template <class V>
using HighPlane = Plane<V::kLanes, 1>;

// The masks of fields [0, kPerHalf) of a plane, vector after vector.
template <class V, class P>
struct Masks {
  alignas(64) int32_t m[P::kPerHalf][V::kLanes];
  Masks() {
    for (int j = 0; j < P::kPerHalf; ++j)
      for (int l = 0; l < V::kLanes; ++l) m[j][l] = static_cast<int32_t>(P::mask(j));
  }
  typename V::I operator[](int j) const { return V::load_i(m[j]); }
};

// Bit 2 of each 2-bit field f of a word: where gemv_tile puts the high bit
// of a 3-bit code.
template <class V>
struct HighBitMasks {
  alignas(64) int32_t m[8][V::kLanes];
  HighBitMasks() {
    for (int f = 0; f < 8; ++f)
      for (int l = 0; l < V::kLanes; ++l) m[f][l] = static_cast<int32_t>(4u << (2 * f));
  }
  typename V::I operator[](int f) const { return V::load_i(m[f]); }
};

// Words of one row's planes, super-block by super-block.
template <class V, int kBits>
struct RowReader {
  int64_t words;     // words of the low plane
  int64_t hi_start;  // first word of the 1-bit plane (3-bit rows)

  explicit RowReader(const QuantMatrix& w)
      : words(w.k * low_plane_bits(kBits) / 32), hi_start(high_plane_offset(w.k)) {}
  int64_t super_blocks() const { return ceil_div(words, V::kLanes); }

  typename V::I low(const uint32_t* row, int64_t sb) const {
    const int64_t first = sb * V::kLanes, valid = min64(V::kLanes, words - first);
    if (valid == V::kLanes) return V::load_i(row + first);
    return V::load_i_partial(row + first, static_cast<int>(valid));
  }
  // The high bits of the codes of low(row, sb), in the same lanes.
  typename V::I high(const uint32_t* row, int64_t sb) const {
    const int64_t first = sb * V::kLanes, valid = min64(V::kLanes, words - first);
    return V::spread_pairs(V::load_i_partial(row + hi_start + first / 2, static_cast<int>((valid + 1) / 2)));
  }
};

// For each super-block, the first group it touches and, per lane, the offset
// of that lane's group from it (the same for every row).
template <class V, int kBits>
struct GroupLanes {
  Scratch<int32_t> first, offset;

  GroupLanes(const QuantMatrix& w, int64_t super_blocks)
      : first(super_blocks), offset(super_blocks * V::kLanes) {
    using P = LowPlane<V, kBits>;
    const int64_t last = w.groups() - 1;
    for (int64_t sb = 0; sb < super_blocks; ++sb) {
      const int64_t g0 = sb * P::kCodes / w.group_size;
      first.get()[sb] = static_cast<int32_t>(g0);
      for (int l = 0; l < V::kLanes; ++l) {
        const int64_t g = min64(last, (sb * P::kCodes + l * P::kPerLane) / w.group_size);
        offset.get()[sb * V::kLanes + l] = static_cast<int32_t>(g - g0);
      }
    }
  }
  // values[g] of each lane's group g; values must be readable kLanes past
  // the first group of the super-block.
  typename V::F gather(const float* values, int64_t sb) const {
    return V::permute(V::load(values + first.get()[sb]), V::load_i(offset.get() + sb * V::kLanes));
  }
};

// count values of dtype t starting at src[i0], to fp32. dst must have room
// for count rounded up to a multiple of kLanes: a 16-bit tail is converted
// (zero-padded) and stored as a whole vector.
template <class V>
void load_floats(const void* src, DType t, int64_t i0, int64_t count, float* dst) {
  constexpr int L = V::kLanes;
  if (t == DType::kF32) {
    std::memcpy(dst, static_cast<const float*>(src) + i0, static_cast<size_t>(count) * 4);
    return;
  }
  const bool f16 = t == DType::kF16;
  const uint16_t* s = static_cast<const uint16_t*>(src) + i0;
  int64_t i = 0;
  for (; i + L <= count; i += L) V::store(dst + i, f16 ? V::load_f16(s + i) : V::load_bf16(s + i));
  if (i < count) {
    const int rest = static_cast<int>(count - i);
    V::store(dst + i, f16 ? V::load_f16_partial(s + i, rest) : V::load_bf16_partial(s + i, rest));
  }
}

// x permuted to the lane order of plane P, times 2^-shift(j) * extra, zero past k.
// out has room for whole super-blocks.
template <class V, class P>
void permute_row(const float* x, int64_t k, int64_t super_blocks, float extra, bool prescale,
                 float* out) {
  constexpr int L = V::kLanes;
  for (int64_t sb = 0; sb < super_blocks; ++sb) {
    for (int j = 0; j < P::kPerLane; ++j) {
      const float factor = prescale ? extra * P::scale(j) : extra;
      for (int l = 0; l < L; ++l) {
        const int64_t c = sb * P::kCodes + P::code(j, l);
        out[sb * P::kCodes + j * L + l] = c < k ? x[c] * factor : 0.0f;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// GEMV (few activation rows): y[m][n] = sum_g s[n][g] * dot(q[n][g], x[m][g])
//                                       - sum_g s[n][g] * z[n][g] * xsum[m][g]
// R weight rows at a time share each activation load, MB activation rows share
// each decoded weight vector; C independent accumulators per pair hide the FMA
// latency when R * MB is small.

struct GemvX {
  const float* lo;   // [m][kpad] permuted, pre-scaled for the low plane
  const float* sum;  // [m][groups]
  int64_t kpad;
};

template <class V, int kBits>
void prepare_gemv_x(const QuantMatrix& w, const float* x, int64_t m, int64_t stride,
                    int64_t super_blocks, int64_t kpad, float* lo, float* sum) {
  const int64_t groups = w.groups();
  for (int64_t mi = 0; mi < m; ++mi) {
    const float* xr = x + mi * stride;
    permute_row<V, LowPlane<V, kBits>>(xr, w.k, super_blocks, 1.0f, true, lo + mi * kpad);
    for (int64_t g = 0; g < groups; ++g) {
      typename V::F acc = V::zero();
      for (int64_t i = g * w.group_size; i < (g + 1) * w.group_size; i += V::kLanes) {
        acc = V::add(acc, V::load(xr + i));
      }
      sum[mi * groups + g] = V::sum(acc);
    }
  }
}

// Scales of row n as fp32 (padded with kLanes zeros for GroupLanes::gather),
// and the row's zero term for activation rows [0, mb): -sum_g s * z * xsum[m][g].
template <class V>
void row_scales(const QuantMatrix& w, const GemvX& x, int64_t n, int mb, float* scales,
                float* zeros, float* offsets) {
  constexpr int L = V::kLanes;
  const int64_t groups = w.groups();
  load_floats<V>(w.scales, w.scale_dtype, n * groups, groups, scales);
  load_floats<V>(w.zeros, w.scale_dtype, n * groups, groups, zeros);
  for (int l = 0; l < L; ++l) scales[groups + l] = 0.0f;
  for (int j = 0; j < mb; ++j) {
    const float* xs = x.sum + j * groups;
    typename V::F acc = V::zero();
    int64_t g = 0;
    for (; g + L <= groups; g += L) {
      acc = V::fmadd(V::mul(V::load(scales + g), V::load(zeros + g)), V::load(xs + g), acc);
    }
    float total = V::sum(acc);
    for (; g < groups; ++g) total += scales[g] * zeros[g] * xs[g];
    offsets[j] = -total;
  }
}

// Dot products of R weight rows with MB activation rows, scaled per group.
// 3-bit codes are assembled in the integer lanes before the conversion: the
// high bit of field f is shifted next to its low bits (one shift and one AND),
// so 3-bit rows cost one conversion and one FMA per kLanes codes, like 2-bit.
template <class V, int kBits, int R, int MB>
void gemv_tile(const RowReader<V, kBits>& reader, const GroupLanes<V, kBits>& lanes,
               const GemvX& x, const uint32_t* const* rows, const float* const* scales,
               typename V::F (&result)[R][MB]) {
  using F = typename V::F;
  using I = typename V::I;
  using Lo = LowPlane<V, kBits>;
  constexpr int L = V::kLanes, C = R * MB <= 3 ? 2 : 1;
  static const Masks<V, Lo> lo_masks;
  static const HighBitMasks<V> hi_masks;

  F acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = V::zero();
  const int64_t super_blocks = reader.super_blocks();
  for (int64_t sb = 0; sb < super_blocks; ++sb) {
    F dot[R][MB][C];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j)
        for (int c = 0; c < C; ++c) dot[r][j][c] = V::zero();
    I raw[R], high[R];
    for (int r = 0; r < R; ++r) {
      raw[r] = reader.low(rows[r], sb);
      if (kBits == 3) high[r] = reader.high(rows[r], sb);
    }
    const float* xlo = x.lo + sb * Lo::kCodes;
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
#pragma GCC unroll 8
      for (int f = 0; f < Lo::kPerHalf; ++f) {
        const I mask = lo_masks[f];
        const int field = half * Lo::kPerHalf + f;
        F xv[MB];
        for (int j = 0; j < MB; ++j) xv[j] = V::load(xlo + j * x.kpad + field * L);
        for (int r = 0; r < R; ++r) {
          I v = V::and_(raw[r], mask);
          if (kBits == 3) v = V::or_(v, V::and_(V::slli(high[r], f + 2), hi_masks[f]));
          const F q = V::to_float(v);
          for (int j = 0; j < MB; ++j) dot[r][j][half % C] = V::fmadd(q, xv[j], dot[r][j][half % C]);
        }
      }
      if (half == 0) {
        for (int r = 0; r < R; ++r) {
          raw[r] = V::srli16(raw[r]);
          if (kBits == 3) high[r] = V::srli(high[r], 8);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const F s = lanes.gather(scales[r], sb);
      for (int j = 0; j < MB; ++j) {
        F d = dot[r][j][0];
        for (int c = 1; c < C; ++c) d = V::add(d, dot[r][j][c]);
        acc[r][j] = V::fmadd(d, s, acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) result[r][j] = acc[r][j];
}

// Rows [nb, ne) for all MB activation rows, R rows at a time.
template <class V, int kBits, int R, int MB>
void gemv_rows(const QuantMatrix& w, const RowReader<V, kBits>& reader,
               const GroupLanes<V, kBits>& lanes, const GemvX& x, int64_t nb, int64_t ne, float* y) {
  constexpr int L = V::kLanes;
  const int64_t stride = w.groups() + L;
  Scratch<float> buf(R * stride + stride + R * MB);
  float* zeros = buf.get() + R * stride;
  float* offsets = zeros + stride;
  const float* scales[R];
  const uint32_t* rows[R];
  for (int r = 0; r < R; ++r) scales[r] = buf.get() + r * stride;
  for (int64_t n = nb; n < ne; n += R) {
    // A short last tile repeats its last row: computed twice, stored once.
    for (int r = 0; r < R; ++r) {
      const int64_t row = min64(n + r, ne - 1);
      rows[r] = w.packed + row * w.row_words();
      row_scales<V>(w, x, row, MB, buf.get() + r * stride, zeros, offsets + r * MB);
    }
    typename V::F acc[R][MB];
    gemv_tile<V, kBits, R, MB>(reader, lanes, x, rows, scales, acc);
    for (int r = 0; r < R && n + r < ne; ++r) {
      for (int j = 0; j < MB; ++j) y[j * w.n + n + r] = V::sum(acc[r][j]) + offsets[r * MB + j];
    }
  }
}

template <class V, int kBits>
void gemv(const QuantMatrix& w, const float* x, int64_t m, int64_t stride, float* y,
          const Parallel& par) {
  const RowReader<V, kBits> reader(w);
  const int64_t super_blocks = reader.super_blocks();
  const int64_t kpad = super_blocks * LowPlane<V, kBits>::kCodes;
  Scratch<float> lo(m * kpad), sum(m * w.groups());
  prepare_gemv_x<V, kBits>(w, x, m, stride, super_blocks, kpad, lo.get(), sum.get());
  const GemvX gx{lo.get(), sum.get(), kpad};
  const GroupLanes<V, kBits> lanes(w, super_blocks);
  for_range(par, w.n, 16, [&](int64_t nb, int64_t ne) {
    switch (m) {
      case 1: gemv_rows<V, kBits, 4, 1>(w, reader, lanes, gx, nb, ne, y); break;
      case 2: gemv_rows<V, kBits, 2, 2>(w, reader, lanes, gx, nb, ne, y); break;
      case 3: gemv_rows<V, kBits, 1, 3>(w, reader, lanes, gx, nb, ne, y); break;
      default: gemv_rows<V, kBits, 1, 4>(w, reader, lanes, gx, nb, ne, y); break;
    }
  });
}

// ------------------------------------------------------------------------------------------
// GEMM (more activation rows): weight rows are decoded, kGemmRows at a time
// and kChunk codes at a time, into an fp32 panel in L1; a register-blocked
// micro-kernel multiplies it with the transposed activations xt[k][m] of that
// chunk (in L2), kGemmRows x (2 vectors of m) outputs at a time. Decoding costs
// about as much as 1/M of the multiplications.

constexpr int64_t kChunk = 256;  // codes of K per panel: a multiple of every super-block

// xt[kk][mi] = x[mi][code(kk)] in the lane order of the low plane (for 3 bits
// the 1-bit plane has the same order), zero for padding codes and rows.
template <class V, int kBits>
void prepare_gemm_x(const QuantMatrix& w, const float* x, int64_t m, int64_t stride,
                    int64_t kpad, int64_t mp, float* xt, const Parallel& par) {
  using P = LowPlane<V, kBits>;
  constexpr int L = V::kLanes;
  for_range(par, kpad / P::kCodes, 1, [&](int64_t sbb, int64_t sbe) {
    for (int64_t sb = sbb; sb < sbe; ++sb) {
      for (int j = 0; j < P::kPerLane; ++j) {
        for (int l = 0; l < L; ++l) {
          const int64_t c = sb * P::kCodes + P::code(j, l);
          float* dst = xt + (sb * P::kCodes + j * L + l) * mp;
          for (int64_t mi = 0; mi < mp; ++mi) dst[mi] = (c < w.k && mi < m) ? x[mi * stride + c] : 0.0f;
        }
      }
    }
  });
}

// Every row's scales s and offsets -s * z as fp32, [n][groups + kLanes] each
// (padded for GroupLanes::gather), converted once per call.
template <class V>
struct RowScales {
  int64_t stride;
  Scratch<float> scales, offsets;

  RowScales(const QuantMatrix& w, const Parallel& par)
      : stride(w.groups() + V::kLanes), scales(w.n * stride), offsets(w.n * stride) {
    const int64_t groups = w.groups();
    for_range(par, w.n, 64, [&](int64_t nb, int64_t ne) {
      for (int64_t n = nb; n < ne; ++n) {
        float* s = scales.get() + n * stride;
        float* o = offsets.get() + n * stride;
        load_floats<V>(w.scales, w.scale_dtype, n * groups, groups, s);
        load_floats<V>(w.zeros, w.scale_dtype, n * groups, groups, o);
        for (int64_t g = 0; g < groups; ++g) o[g] *= -s[g];
        for (int64_t g = groups; g < stride; ++g) s[g] = o[g] = 0.0f;
      }
    });
  }
};

// panel[r][kk] = W[n + r][code(kk)] for the codes of super-blocks [sb0, sb1),
// fully dequantized: s * q - s * z (rows past the end: zero).
template <class V, int kBits>
void decode_panel(const QuantMatrix& w, const RowReader<V, kBits>& reader,
                  const GroupLanes<V, kBits>& lanes, const RowScales<V>& row_scales, int64_t n,
                  int64_t sb0, int64_t sb1, float* panel) {
  using F = typename V::F;
  using I = typename V::I;
  using Lo = LowPlane<V, kBits>;
  using Hi = HighPlane<V>;
  constexpr int L = V::kLanes;
  static const Masks<V, Lo> lo_masks;
  static const Masks<V, Hi> hi_masks;
  const int64_t width = (sb1 - sb0) * Lo::kCodes;
  for (int r = 0; r < V::kGemmRows; ++r) {
    float* out = panel + r * width;
    if (n + r >= w.n) {
      for (int64_t i = 0; i < width; ++i) out[i] = 0.0f;
      continue;
    }
    const float* scales = row_scales.scales.get() + (n + r) * row_scales.stride;
    const float* offsets = row_scales.offsets.get() + (n + r) * row_scales.stride;
    const uint32_t* row = w.packed + (n + r) * w.row_words();
    for (int64_t sb = sb0; sb < sb1; ++sb) {
      const F s = lanes.gather(scales, sb);
      const F offset = lanes.gather(offsets, sb);
      I raw = reader.low(row, sb);
      I high = kBits == 3 ? reader.high(row, sb) : raw;
      float* dst = out + (sb - sb0) * Lo::kCodes;
      for (int half = 0; half < 2; ++half) {
#pragma GCC unroll 8
        for (int f = 0; f < Lo::kPerHalf; ++f) {
          const int field = half * Lo::kPerHalf + f;
          const F q = V::to_float(V::and_(raw, lo_masks[f]));
          F wv = V::fmadd(q, V::mul(s, V::set1(Lo::scale(f))), offset);
          if (kBits == 3) {
            const F qh = V::to_float(V::and_(high, hi_masks[field]));
            wv = V::fmadd(qh, V::mul(s, V::set1(4.0f * Hi::scale(field))), wv);
          }
          V::store(dst + field * L, wv);
        }
        raw = V::srli16(raw);
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
  using Lo = LowPlane<V, kBits>;
  constexpr int L = V::kLanes, R = V::kGemmRows;
  const RowReader<V, kBits> reader(w);
  const int64_t super_blocks = reader.super_blocks(), kpad = super_blocks * Lo::kCodes;
  const int64_t mp = ceil_div(m, L) * L, panels = ceil_div(w.n, R);
  const int64_t chunk_blocks = kChunk / Lo::kCodes;
  Scratch<float> xt(kpad * mp), yt(panels * R * mp);
  prepare_gemm_x<V, kBits>(w, x, m, stride, kpad, mp, xt.get(), par);
  const GroupLanes<V, kBits> lanes(w, super_blocks);
  const RowScales<V> row_scales(w, par);
  for_range(par, panels, 1, [&](int64_t pb, int64_t pe) {
    Scratch<float> panel(R * kChunk);
    // K outermost: the chunk of xt stays in L2 while every panel of this range uses it.
    for (int64_t sb0 = 0; sb0 < super_blocks; sb0 += chunk_blocks) {
      const int64_t sb1 = min64(super_blocks, sb0 + chunk_blocks);
      const int64_t width = (sb1 - sb0) * Lo::kCodes;
      const float* xt_chunk = xt.get() + sb0 * Lo::kCodes * mp;
      for (int64_t p = pb; p < pe; ++p) {
        decode_panel<V, kBits>(w, reader, lanes, row_scales, p * R, sb0, sb1, panel.get());
        float* c = yt.get() + p * R * mp;
        int64_t m0 = 0;
        for (; m0 + 2 * L <= mp; m0 += 2 * L) {
          micro_kernel<V, 2>(panel.get(), width, xt_chunk + m0, mp, c + m0, sb0 > 0);
        }
        if (m0 < mp) micro_kernel<V, 1>(panel.get(), width, xt_chunk + m0, mp, c + m0, sb0 > 0);
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
  dispatch_bits(w.bits, [&](auto bits) {
    linear_bits<V, decltype(bits)::value>(w, x, m, stride, y, par);
  });
}

}  // namespace LOWBIT_SIMD_NAMESPACE
}  // namespace cpu
}  // namespace lowbit
