// The integer GEMV of cpu::linear for a few activation rows: x quantized to
// int8 in groups of 32 (lowbit/q8.h), codes multiplied as unsigned bytes by
// the signed bytes of x with integer dot products (V::dot_add: VNNI
// `vpdpbusd`, or `vpmaddubsw` on AVX2, widened to 32 bits once per
// super-block), scales applied once per 32-bit lane, the zero points folded
// in through per-group sums of x.
// Included after simd_linear.h, under the same target switch and namespace;
// it reuses its RowReader, GroupLanes and load_floats. Besides the operations
// simd_linear.h lists, `V` provides zero_i, splat_bytes (a byte in every
// byte), or_and (a | (b & c)), expand_nibbles, and dot_add / dot_lanes: an
// accumulator of u8 x s8 products over one super-block and its sums per
// 32-bit lane (see vec16.h and avx2.cpp).
//
// Decoding ("a lane is a word", as in simd_linear.h, but byte-wise). A
// super-block is kLanes words of the low plane, 4 * kLanes bytes; byte b of
// it holds codes b * P .. b * P + P - 1 (P = 8 / plane bits fields a byte).
// Vector j masks field j of every byte, so byte b holds code b * P + j as an
// unsigned byte; x is reordered once per call so that byte b of its vector j
// is x[b * P + j]. A 32-bit lane then sums the products of four codes of one
// word: a word lies in one weight group and one x group, so each lane takes
// one weight scale and one x scale. 3-bit rows add bit 2 from the 1-bit
// plane: expand_nibbles gives byte b the 4 high bits of its 4 codes (in
// canonical order: bit j of nibble b is code b * 4 + j's), shifted into place
// and OR-ed in with one instruction.

#if !defined(LOWBIT_SIMD_NAMESPACE)
#error "define LOWBIT_SIMD_NAMESPACE before including simd_q8_gemv.h"
#endif

namespace lowbit {
namespace cpu {
namespace LOWBIT_SIMD_NAMESPACE {

// x in the byte order of the weight's super-blocks, with per-lane x scales
// and per-weight-group sums of the dequantized x (for the zero points).
template <class V, int kBits>
struct Q8Operand {
  static constexpr int kPlaneBits = low_plane_bits(kBits);
  static constexpr int kFields = 8 / kPlaneBits;       // codes a byte holds
  static constexpr int kBlockBytes = 4 * V::kLanes;    // bytes of a super-block
  static constexpr int kBlockCodes = kBlockBytes * kFields;
  int64_t m, super_blocks, q_stride, lane_stride, groups, sums_stride;
  Scratch<int8_t> q;        // [m][super_blocks][kFields][kBlockBytes]
  Scratch<float> lanes;     // [m][super_blocks][kLanes]: each lane's x scale
  Scratch<float> sums;      // [m][sums_stride]: sum over group g of d * q, zero past the groups

  Q8Operand(const QuantMatrix& w, const Q8Rows& x, int64_t sbs)
      : m(x.m), super_blocks(sbs), q_stride(sbs * kFields * kBlockBytes), lane_stride(sbs * V::kLanes),
        groups(w.groups()), sums_stride(ceil_div(groups, V::kLanes) * V::kLanes), q(x.m * q_stride),
        lanes(x.m * lane_stride), sums(x.m * sums_stride) {
    const int64_t k = w.k, xgroups = k / kActGroup;
    for (int64_t mi = 0; mi < x.m; ++mi) {
      const int8_t* xq = x.q + mi * k;
      const float* xd = x.scales + mi * xgroups;
      int8_t* out = q.get() + mi * q_stride;
      for (int64_t sb = 0; sb < sbs; ++sb) {
        for (int j = 0; j < kFields; ++j) {
          for (int b = 0; b < kBlockBytes; ++b) {
            const int64_t c = sb * kBlockCodes + b * kFields + j;
            out[(sb * kFields + j) * kBlockBytes + b] = c < k ? xq[c] : 0;
          }
        }
        for (int l = 0; l < V::kLanes; ++l) {
          const int64_t c = sb * kBlockCodes + l * 4 * kFields;
          lanes.get()[mi * lane_stride + sb * V::kLanes + l] = c < k ? xd[c / kActGroup] : 0.0f;
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        float total = 0.0f;
        for (int64_t xg = g * w.group_size / kActGroup; xg < (g + 1) * w.group_size / kActGroup; ++xg) {
          int32_t s = 0;
          for (int i = 0; i < kActGroup; ++i) s += xq[xg * kActGroup + i];
          total += xd[xg] * static_cast<float>(s);
        }
        sums.get()[mi * sums_stride + g] = total;
      }
      for (int64_t g = groups; g < sums_stride; ++g) sums.get()[mi * sums_stride + g] = 0.0f;
    }
  }
};

// The high bit of field j of every byte, moved to bit 2 (the epi32 shifts
// never carry a neighbouring byte's bit into bit 2).
template <class V>
typename V::I high_bit_at_2(typename V::I nibbles, int j) {
  switch (j) {
    case 0: return V::slli(nibbles, 2);
    case 1: return V::slli(nibbles, 1);
    case 2: return nibbles;
    default: return V::srli(nibbles, 1);
  }
}

// Dot products of R weight rows with MB activation rows. The rows of the next
// tile are prefetched as this one streams: each row is too short (a few
// cache lines) for the hardware prefetcher to get ahead.
template <class V, int kBits, int R, int MB>
void q8_tile(const RowReader<V, kBits>& reader, const GroupLanes<V, kBits>& lanes,
             const Q8Operand<V, kBits>& x, int64_t m0, const uint32_t* const* rows,
             const uint32_t* const* next_rows, const float* const* scales,
             typename V::F (&result)[R][MB]) {
  using F = typename V::F;
  using I = typename V::I;
  using X = Q8Operand<V, kBits>;
  constexpr int L = V::kLanes;
  const I field_mask = V::splat_bytes(static_cast<uint8_t>((1u << X::kPlaneBits) - 1u));
  const I bit2 = V::splat_bytes(4);

  F acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = V::zero();
  for (int64_t sb = 0; sb < x.super_blocks; ++sb) {
    I raw[R], high[R];
    for (int r = 0; r < R; ++r) {
      raw[r] = reader.low(rows[r], sb);
      __builtin_prefetch(next_rows[r] + sb * L);
      if (kBits == 3) {
        const int64_t first = sb * L, valid = min64(L, reader.words - first);
        const uint32_t* hi = rows[r] + reader.hi_start + first / 2;
        high[r] = V::expand_nibbles(hi, static_cast<int>((valid + 1) / 2));
        __builtin_prefetch(next_rows[r] + reader.hi_start + first / 2);
      }
    }
    I dot[R][MB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) dot[r][j] = V::zero_i();
    const int8_t* xq = x.q.get() + m0 * x.q_stride + sb * X::kFields * X::kBlockBytes;
#pragma GCC unroll 4
    for (int f = 0; f < X::kFields; ++f) {
      I xv[MB];
      for (int j = 0; j < MB; ++j) xv[j] = V::load_i(xq + j * x.q_stride + f * X::kBlockBytes);
      for (int r = 0; r < R; ++r) {
        I code = V::and_(V::srli(raw[r], X::kPlaneBits * f), field_mask);
        if (kBits == 3) code = V::or_and(code, high_bit_at_2<V>(high[r], f), bit2);
        for (int j = 0; j < MB; ++j) dot[r][j] = V::dot_add(dot[r][j], code, xv[j]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const F s = lanes.gather(scales[r], sb);
      for (int j = 0; j < MB; ++j) {
        const F sx = V::load(x.lanes.get() + (m0 + j) * x.lane_stride + sb * L);
        acc[r][j] = V::fmadd(V::to_float(V::dot_lanes(dot[r][j])), V::mul(s, sx), acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) result[r][j] = acc[r][j];
}

// The dot products of one tile for activation rows [m0, m0 + mb), mb <= 4,
// summed over lanes into y (plus each row's zero term, offsets[r][j]).
template <class V, int kBits, int R>
void q8_block(const RowReader<V, kBits>& reader, const GroupLanes<V, kBits>& lanes,
              const Q8Operand<V, kBits>& x, int64_t m0, int mb, const uint32_t* const* rows,
              const uint32_t* const* next_rows, const float* const* scales,
              const float* offsets, int64_t n, int64_t valid, int64_t out_stride, float* y) {
  auto store = [&](auto mb_constant) {
    constexpr int MB = decltype(mb_constant)::value;
    typename V::F acc[R][MB];
    q8_tile<V, kBits, R, MB>(reader, lanes, x, m0, rows, next_rows, scales, acc);
    for (int r = 0; r < valid; ++r) {
      for (int j = 0; j < MB; ++j) {
        y[(m0 + j) * out_stride + n + r] = V::sum(acc[r][j]) + offsets[r * x.m + m0 + j];
      }
    }
  };
  switch (mb) {
    case 1: store(std::integral_constant<int, 1>{}); break;
    case 2: store(std::integral_constant<int, 2>{}); break;
    case 3: store(std::integral_constant<int, 3>{}); break;
    default: store(std::integral_constant<int, 4>{}); break;
  }
}

// Weight rows [nb, ne), R at a time, for every activation row. A tile's
// scales and zero terms are converted once; its rows stay in L1 while blocks
// of 4 activation rows pass over them.
template <class V, int kBits, int R>
void q8_rows(const QuantMatrix& w, const RowReader<V, kBits>& reader,
             const GroupLanes<V, kBits>& lanes, const Q8Operand<V, kBits>& x, int64_t nb,
             int64_t ne, float* y) {
  constexpr int L = V::kLanes;
  const int64_t groups = w.groups(), stride = groups + L;
  Scratch<float> buf(R * stride + stride + R * x.m);
  float* zeros = buf.get() + R * stride;
  float* offsets = zeros + stride;  // [R][m]
  const float* scales[R];
  const uint32_t *rows[R], *next_rows[R];
  // Zero past the groups, as GroupLanes::gather and the vector loops below need.
  for (int64_t i = 0; i < R * stride + stride; ++i) buf.get()[i] = 0.0f;
  for (int r = 0; r < R; ++r) scales[r] = buf.get() + r * stride;
  for (int64_t n = nb; n < ne; n += R) {
    // A short last tile repeats its last row: computed twice, stored once.
    for (int r = 0; r < R; ++r) {
      const int64_t row = min64(n + r, ne - 1);
      rows[r] = w.packed + row * w.row_words();
      next_rows[r] = w.packed + min64(n + R + r, ne - 1) * w.row_words();
      float* s = buf.get() + r * stride;
      load_floats<V>(w.scales, w.scale_dtype, row * groups, groups, s);
      load_floats<V>(w.zeros, w.scale_dtype, row * groups, groups, zeros);
      for (int64_t g = 0; g < groups; g += L) V::store(zeros + g, V::mul(V::load(s + g), V::load(zeros + g)));
      for (int64_t j = 0; j < x.m; ++j) {  // -sum_g s * z * (sum of x's group g)
        const float* sums = x.sums.get() + j * x.sums_stride;
        typename V::F total = V::zero();
        for (int64_t g = 0; g < groups; g += L) total = V::fmadd(V::load(zeros + g), V::load(sums + g), total);
        offsets[r * x.m + j] = -V::sum(total);
      }
    }
    for (int64_t m0 = 0; m0 < x.m; m0 += 4) {
      q8_block<V, kBits, R>(reader, lanes, x, m0, static_cast<int>(min64(4, x.m - m0)), rows,
                            next_rows, scales, offsets, n, min64(R, ne - n), w.n, y);
    }
  }
}

template <class V, int kBits>
void q8_gemv(const QuantMatrix& w, const Q8Rows& x, float* y, const Parallel& par) {
  const RowReader<V, kBits> reader(w);
  const Q8Operand<V, kBits> xo(w, x, reader.super_blocks());
  const GroupLanes<V, kBits> lanes(w, reader.super_blocks());
  for_range(par, w.n, 16, [&](int64_t nb, int64_t ne) {
    // More weight rows per tile share each activation load when there are few.
    switch (x.m) {
      case 1: q8_rows<V, kBits, 4>(w, reader, lanes, xo, nb, ne, y); break;
      case 2: q8_rows<V, kBits, 2>(w, reader, lanes, xo, nb, ne, y); break;
      default: q8_rows<V, kBits, 1>(w, reader, lanes, xo, nb, ne, y); break;
    }
  });
}

template <class V>
void linear_q8_simd(const QuantMatrix& w, const Q8Rows& x, float* y, const Parallel& par) {
  if (x.m == 0 || w.n == 0) return;
  dispatch_bits(w.bits, [&](auto bits) { q8_gemv<V, decltype(bits)::value>(w, x, y, par); });
}

}  // namespace LOWBIT_SIMD_NAMESPACE
}  // namespace cpu
}  // namespace lowbit
