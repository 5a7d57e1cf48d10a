// The integer GEMV of cpu::linear for a few activation rows: x quantized to
// int8 in groups of 32 (lowbit/q8.h), codes multiplied as unsigned bytes by
// the signed bytes of x with 4-way integer dot products (V::dpbusd: VNNI
// `vpdpbusd`, or `vpmaddubsw` + `vpmaddwd` on AVX2), scales applied once per
// 32-bit lane, the zero points folded in through per-group sums of x.
// Included after simd_linear.h, under the same target switch and namespace;
// it reuses its RowReader, GroupLanes and row_scales.
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
  int64_t super_blocks, q_stride, lane_stride, groups;
  Scratch<int8_t> q;        // [m][super_blocks][kFields][kBlockBytes]
  Scratch<float> lanes;     // [m][super_blocks][kLanes]: each lane's x scale
  Scratch<float> sums;      // [m][groups]: sum over the group of d * q

  Q8Operand(const QuantMatrix& w, const Q8Rows& x, int64_t sbs)
      : super_blocks(sbs), q_stride(sbs * kFields * kBlockBytes), lane_stride(sbs * V::kLanes),
        groups(w.groups()), q(x.m * q_stride), lanes(x.m * lane_stride), sums(x.m * groups) {
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
        sums.get()[mi * groups + g] = total;
      }
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
        for (int j = 0; j < MB; ++j) dot[r][j] = V::dpbusd(dot[r][j], code, xv[j]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const F s = lanes.gather(scales[r], sb);
      for (int j = 0; j < MB; ++j) {
        const F sx = V::load(x.lanes.get() + (m0 + j) * x.lane_stride + sb * L);
        acc[r][j] = V::fmadd(V::to_float(dot[r][j]), V::mul(s, sx), acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) result[r][j] = acc[r][j];
}

// Weight rows [nb, ne) for activation rows [m0, m0 + MB), R rows at a time.
template <class V, int kBits, int R, int MB>
void q8_rows(const QuantMatrix& w, const RowReader<V, kBits>& reader,
             const GroupLanes<V, kBits>& lanes, const Q8Operand<V, kBits>& x, int64_t m0,
             int64_t nb, int64_t ne, float* y) {
  constexpr int L = V::kLanes;
  const int64_t stride = w.groups() + L;
  Scratch<float> buf(R * stride + stride + R * MB);
  float* zeros = buf.get() + R * stride;
  float* offsets = zeros + stride;
  const float* scales[R];
  const uint32_t *rows[R], *next_rows[R];
  for (int r = 0; r < R; ++r) scales[r] = buf.get() + r * stride;
  // row_scales reads the activation rows' group sums through a GemvX.
  const GemvX sums{nullptr, x.sums.get() + m0 * x.groups, 0};
  for (int64_t n = nb; n < ne; n += R) {
    // A short last tile repeats its last row: computed twice, stored once.
    for (int r = 0; r < R; ++r) {
      const int64_t row = min64(n + r, ne - 1);
      rows[r] = w.packed + row * w.row_words();
      next_rows[r] = w.packed + min64(n + R + r, ne - 1) * w.row_words();
      row_scales<V>(w, sums, row, MB, buf.get() + r * stride, zeros, offsets + r * MB);
    }
    typename V::F acc[R][MB];
    q8_tile<V, kBits, R, MB>(reader, lanes, x, m0, rows, next_rows, scales, acc);
    for (int r = 0; r < R && n + r < ne; ++r) {
      for (int j = 0; j < MB; ++j) y[(m0 + j) * w.n + n + r] = V::sum(acc[r][j]) + offsets[r * MB + j];
    }
  }
}

// Weight rows a tile of the many-rows case keeps in L1 while every block of
// 4 activation rows passes over them.
constexpr int64_t kQ8TileRows = 16;

template <class V, int kBits>
void q8_gemv(const QuantMatrix& w, const Q8Rows& x, float* y, const Parallel& par) {
  const RowReader<V, kBits> reader(w);
  const Q8Operand<V, kBits> xo(w, x, reader.super_blocks());
  const GroupLanes<V, kBits> lanes(w, reader.super_blocks());
  for_range(par, w.n, kQ8TileRows, [&](int64_t nb, int64_t ne) {
    switch (x.m) {
      case 1: q8_rows<V, kBits, 4, 1>(w, reader, lanes, xo, 0, nb, ne, y); return;
      case 2: q8_rows<V, kBits, 2, 2>(w, reader, lanes, xo, 0, nb, ne, y); return;
      case 3: q8_rows<V, kBits, 1, 3>(w, reader, lanes, xo, 0, nb, ne, y); return;
      default: break;
    }
    for (int64_t tb = nb; tb < ne; tb += kQ8TileRows) {
      const int64_t te = min64(ne, tb + kQ8TileRows);
      int64_t m0 = 0;
      for (; m0 + 4 <= x.m; m0 += 4) q8_rows<V, kBits, 1, 4>(w, reader, lanes, xo, m0, tb, te, y);
      switch (x.m - m0) {
        case 1: q8_rows<V, kBits, 1, 1>(w, reader, lanes, xo, m0, tb, te, y); break;
        case 2: q8_rows<V, kBits, 1, 2>(w, reader, lanes, xo, m0, tb, te, y); break;
        case 3: q8_rows<V, kBits, 1, 3>(w, reader, lanes, xo, m0, tb, te, y); break;
        default: break;
      }
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
