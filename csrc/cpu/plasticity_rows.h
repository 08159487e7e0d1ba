// Row machinery of the CPU plasticity kernels: the neighbour rows of a
// lattice row, padded field rows, and the sweeps over a row's synapses.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__F16C__) || defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../plasticity.h"
#include "../stencil.h"
#include "lattice.h"
#include "rows.h"

namespace cellkern {
namespace cpu {

// The neighbour rows of the lattice row (z, y). The stencil's offsets share
// a few distinct row shifts (dz, dy) (9 for moore); per row, `rows` holds the
// row each shift reaches (-1: outside a zero boundary) and `slot` the shift
// of each offset (-1 where its row is missing: every synapse of that offset
// is dead).
struct RowNeighbours {
  std::vector<int64_t> shift_dz, shift_dy, shift_of, rows, slot;
  explicit RowNeighbours(const Lattice& L) : shift_of(L.K), slot(L.K) {
    for (int64_t k = 0; k < L.K; ++k) {
      int64_t s = 0;
      while (s < int64_t(shift_dz.size()) && !(shift_dz[s] == L.dz[k] && shift_dy[s] == L.dy[k])) ++s;
      if (s == int64_t(shift_dz.size())) {
        shift_dz.push_back(L.dz[k]);
        shift_dy.push_back(L.dy[k]);
      }
      shift_of[k] = s;
    }
    rows.resize(shift_dz.size());
  }
  void build(const Lattice& L, int64_t z, int64_t y) {
    for (size_t s = 0; s < rows.size(); ++s) rows[s] = nbr_row(z, y, shift_dz[s], shift_dy[s], L.D, L.H, L.pz, L.py);
    for (int64_t k = 0; k < L.K; ++k) slot[k] = rows[shift_of[k]] < 0 ? -1 : shift_of[k];
  }
};

// dst[R + x] = f(src[x]) for x in [0, W); the R cells on each side hold the
// wrapped values (periodic: edge[e] is the source of the e-th padding cell,
// left then right) or 0 (zero boundary: a neighbour outside reads 0).
template <typename A, typename F>
inline void load_padded(const A* __restrict src, A* __restrict dst, int64_t W, int64_t R, const int64_t* edge, F f) {
#pragma omp simd
  for (int64_t x = 0; x < W; ++x) dst[R + x] = f(src[x]);
  for (int64_t e = 0; e < R; ++e) {
    dst[R - 1 - e] = edge != nullptr ? f(src[edge[e]]) : A(0);
    dst[R + W + e] = edge != nullptr ? f(src[edge[R + e]]) : A(0);
  }
}

template <typename A>
struct Identity {
  A operator()(A v) const { return v; }
};

// Per row: padded rows of one field for the neighbour rows, and the row each
// offset reads (a zero row where its neighbour row does not exist). The
// padded rows are cached by source row: the next row of a plane shares all
// but one row of shifts per plane, so B = 1 loads ~1/3 of them.
//
// Cache slot of the source row (z+dz, y+dy) — unwrapped coordinates, so the
// rows of one neighbourhood never share a slot: (z+dz mod nz)·ny + (y+dy mod
// ny) with nz = 2·reach_z + 1, ny = 2·reach_y + 2; a slot is valid when its
// key is the (sample, row) it holds.
template <typename A>
struct PaddedRows {
  int64_t W, R, P, nz, ny, rows_total;
  std::vector<A> buf, zero;
  std::vector<int64_t> edge;  // periodic x: the source cells of the padding (see load_padded)
  std::vector<int64_t> key, slot_of_shift;
  PaddedRows(const Lattice& L) : W(L.W), R(L.reach_x), P(L.W + 2 * L.reach_x), rows_total(L.D * L.H), zero(P, A(0)) {
    int64_t rz = 0, ry = 0;
    for (int64_t k = 0; k < L.K; ++k) {
      rz = std::max(rz, std::abs(L.dz[k]));
      ry = std::max(ry, std::abs(L.dy[k]));
    }
    nz = 2 * rz + 1;
    ny = 2 * ry + 2;
    buf.resize(nz * ny * P);
    key.assign(nz * ny, -1);
    if (L.px) {
      for (int64_t e = 0; e < R; ++e) edge.push_back(wrap(-1 - e, W));
      for (int64_t e = 0; e < R; ++e) edge.push_back(wrap(W + e, W));
    }
  }
  // the padded rows of `field` (sample b) for the row (z, y)
  template <typename F>
  void load(const Lattice& L, const RowNeighbours& nb, int64_t z, int64_t y, int64_t b, const A* field, F f) {
    slot_of_shift.resize(nb.rows.size());
    for (size_t s = 0; s < nb.rows.size(); ++s) {
      const int64_t slot = wrap(z + nb.shift_dz[s], nz) * ny + wrap(y + nb.shift_dy[s], ny);
      slot_of_shift[s] = slot;
      if (nb.rows[s] < 0) continue;
      const int64_t k = b * rows_total + nb.rows[s];
      if (key[slot] == k) continue;
      key[slot] = k;
      load_padded(field + nb.rows[s] * W, buf.data() + slot * P, W, R, L.px ? edge.data() : nullptr, f);
    }
  }
  // per offset k, the row whose x-th cell is the neighbour of cell x
  void pointers(const RowNeighbours& nb, const Lattice& L, const A** out) const {
    for (int64_t k = 0; k < L.K; ++k) out[k] = at(nb, L, k);
  }
  // the neighbour of cell x at offset k is at(k)[x]
  // (a field never loaded reads as zeros)
  const A* at(const RowNeighbours& nb, const Lattice& L, int64_t k) const {
    const bool loaded = slot_of_shift.size() == nb.rows.size();
    const A* base = (nb.slot[k] < 0 || !loaded) ? zero.data() : buf.data() + slot_of_shift[nb.slot[k]] * P;
    return base + R + L.dx[k];
  }
};

// The x range of live synapses for offset k: all of [0, W) along a periodic
// x, else the cells whose neighbour x + dx lies inside.
inline void live_range(const Lattice& L, int64_t k, int64_t* lo, int64_t* hi) {
  if (L.px) {
    *lo = 0;
    *hi = L.W;
  } else {
    interior_range(L.W, L.dx[k], lo, hi);
  }
}

// out[x] = Σ_k rows[k][x] (or max_k when MAX) for x in [0, W): one register
// per SIMD vector of cells while the K rows stream past.
template <bool MAX, typename A>
inline void reduce_rows(const A* const* rows, int64_t K, int64_t W, A* out) {
  using V = typename Simd<A>::type;
  constexpr int64_t L = sizeof(V) / sizeof(A);
  int64_t x = 0;
  for (; x + L <= W; x += L) {
    V acc = MAX ? V{} - INFINITY : V{};
    for (int64_t k = 0; k < K; ++k) {
      const V v = load<V>(rows[k] + x);
      if constexpr (MAX) {
        acc = v > acc ? v : acc;
      } else {
        acc += v;
      }
    }
    store(out + x, acc);
  }
  for (; x < W; ++x) {
    A acc = MAX ? -INFINITY : A(0);
    for (int64_t k = 0; k < K; ++k) acc = MAX ? std::max(acc, rows[k][x]) : acc + rows[k][x];
    out[x] = acc;
  }
}

// ---- the synapse sweeps ----

// One lane's conversions. bf16 and fp16 go through their bits (and F16C
// where the CPU has it): GCC 12 crashes vectorising c10::Half / BFloat16's own
// conversion operators in these loops.
template <typename A, typename T>
inline A to_acc(const T& v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t u = uint32_t(v.x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return static_cast<A>(f);
  }
#if defined(__F16C__)
  else if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<A>(_cvtsh_ss(v.x));
  }
#endif
  else {
    return static_cast<A>(v);
  }
}

template <typename T, typename A>
inline T from_acc(A a) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const float f = static_cast<float>(a);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    T out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      out.x = uint16_t((u >> 16) | 0x40);  // NaN stays NaN
    } else {
      out.x = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    }
    return out;
  }
#if defined(__F16C__)
  else if constexpr (std::is_same_v<T, c10::Half>) {
    T out;
    out.x = _cvtss_sh(static_cast<float>(a), _MM_FROUND_TO_NEAREST_INT);
    return out;
  }
#endif
  else {
    return static_cast<T>(a);
  }
}

// Unsigned 32-bit and 16-bit integer vectors with the 16 lanes of Simd<float>.
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32), aligned(2)));

// Loads / stores of V (a SIMD vector of A, or A itself) from T, converting.
template <typename V, typename A, typename T>
inline V ld(const T* p) {
  if constexpr (sizeof(V) == sizeof(A)) {
    return to_acc<A>(*p);
  } else if constexpr (std::is_same_v<T, A>) {
    return load<V>(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float> && sizeof(V) == 64) {
    // bf16 → fp32 is a 16-bit shift: a few vector instructions on any ISA
    // (the per-lane form cost ~70 s of compile time in the unrolled sweeps)
    U16x16 h;
    std::memcpy(&h, p, sizeof(h));
    const U32x16 u = __builtin_convertvector(h, U32x16) << 16;
    V v;
    std::memcpy(&v, &u, sizeof(V));
    return v;
  }
#if defined(__AVX512F__)
  else if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    V v;
    std::memcpy(&v, &f, sizeof(V));
    return v;
  }
#elif defined(__F16C__) && defined(__AVX__)
  else if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    // AVX2 machines: two 8-lane conversions per 16-float vector
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    V v;
    std::memcpy(&v, &lo, 32);
    std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
    return v;
  }
#endif
  else {
    A t[sizeof(V) / sizeof(A)];
    for (size_t l = 0; l < sizeof(V) / sizeof(A); ++l) t[l] = to_acc<A>(p[l]);
    return load<V>(t);
  }
}

template <typename V, typename A, typename T>
inline void st(T* p, const V& v) {
  if constexpr (sizeof(V) == sizeof(A)) {
    *p = from_acc<T>(static_cast<A>(v));
  } else if constexpr (std::is_same_v<T, A>) {
    store(p, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float> && sizeof(V) == 64) {
    // from_acc's rounding (to nearest even, NaN stays NaN), on all lanes at once
    U32x16 u;
    std::memcpy(&u, &v, sizeof(V));
    const auto nan = (u & 0x7fffffffu) > 0x7f800000u;
    const U32x16 r = nan ? ((u >> 16) | 0x40u) : ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    const U16x16 h = __builtin_convertvector(r, U16x16);
    std::memcpy(p, &h, sizeof(h));
  }
#if defined(__AVX512F__)
  else if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    __m512 f;
    std::memcpy(&f, &v, sizeof(V));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
  }
#elif defined(__F16C__) && defined(__AVX__)
  else if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    __m256 lo, hi;
    std::memcpy(&lo, &v, 32);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  else {
    A t[sizeof(V) / sizeof(A)];
    store(t, v);
    for (size_t l = 0; l < sizeof(V) / sizeof(A); ++l) p[l] = from_acc<T>(t[l]);
  }
}

// |v|, min and max of scalars or SIMD vectors. On vectors of 16 floats with
// AVX-512 these are single instructions (GCC does not see `v < 0 ? -v : v`
// as an abs, nor the selects as min/max, because of their NaN semantics).
template <typename V>
inline V vabs(V v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<V, typename Simd<float>::type>) {
    return reinterpret_cast<V>(_mm512_abs_ps(reinterpret_cast<__m512>(v)));
  }
#elif defined(__AVX__)
  if constexpr (std::is_same_v<V, typename Simd<float>::type>) {
    // AVX2 machines: the sign bit cleared, per 8-lane half
    const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 h[2];
    std::memcpy(h, &v, sizeof(V));
    h[0] = _mm256_and_ps(h[0], mask);
    h[1] = _mm256_and_ps(h[1], mask);
    std::memcpy(&v, h, sizeof(V));
    return v;
  }
#endif
  return v < 0 ? -v : v;
}

template <typename V>
inline V vclamp(V v, V lo, V hi) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<V, typename Simd<float>::type>) {
    // v as the second operand of each: a NaN v comes through, as in torch.clamp
    return reinterpret_cast<V>(_mm512_max_ps(reinterpret_cast<__m512>(lo),
                                             _mm512_min_ps(reinterpret_cast<__m512>(hi), reinterpret_cast<__m512>(v))));
  }
#elif defined(__AVX__)
  if constexpr (std::is_same_v<V, typename Simd<float>::type>) {
    // AVX2 machines: the same max(lo, min(hi, v)) per 8-lane half (NaN v comes through)
    __m256 h[2], l[2], u[2];
    std::memcpy(h, &v, sizeof(V));
    std::memcpy(l, &lo, sizeof(V));
    std::memcpy(u, &hi, sizeof(V));
    for (int i = 0; i < 2; ++i) h[i] = _mm256_max_ps(l[i], _mm256_min_ps(u[i], h[i]));
    std::memcpy(&v, h, sizeof(V));
    return v;
  }
#endif
  return clamp_weight(v, lo, hi);
}

// Samples before the last: their terms of offset k summed into acc0, acc1
// (FIRST: overwritten) for the cells [0, W) of a row.
template <bool MULT, bool FIRST, typename A>
inline void accumulate_row(int64_t W, A w_min, A w_max, const A* __restrict p, const A* __restrict q,
                           const A* __restrict r, const A* __restrict xn, const A* __restrict zn,
                           const A* __restrict yn, A* __restrict acc0, A* __restrict acc1) {
#pragma omp simd
  for (int64_t x = 0; x < W; ++x) {
    A c0 = FIRST ? A(0) : acc0[x];
    A c1 = FIRST ? A(0) : acc1[x];
    synapse_terms<MULT>(w_min, w_max, p[x], q[x], r[x], xn[x], zn[x], yn[x], &c0, &c1);
    acc0[x] = c0;
    acc1[x] = c1;
  }
}

// What the last sample's sweep over one row reads; the per-offset pointers
// are null for offsets whose neighbour row lies outside a zero boundary.
template <typename A, typename w_t>
struct SweepRow {
  int64_t W, K;
  w_t* const* w;         // per k: the row of w
  const A* const* xn;    // per k: decayed pre traces of the neighbours (already shifted by dx)
  const A* const* zn;    // per k: the neighbours' spikes
  const A* const* yn;    // per k: the neighbours' activity
  const A* const* live;  // per k: 1 where the synapse may change (LIVE only)
  const A* const* acc0;  // per k: the earlier samples' sums (ACC only)
  const A* const* acc1;
  const A *p, *q, *r, *d, *upd;  // per cell: this sample's coefficients, Σ decay, any winner
  A w_min, w_max;
  A* scratch;  // K vectors: the updated weights while Σ|w| is summed (NORM only)
  int64_t prefetch;  // elements ahead of the w being read to prefetch
};

// Offset k of the cells [x, x + lanes of V): w + Δw from this sample's
// terms (plus the earlier samples' sums); a dead synapse keeps w. With NORM,
// Σ|w| before and after add up over the live synapses and w + Δw is returned
// for the scaling; without, the clamped weight is stored.
template <bool MULT, bool NORM, bool LIVE, bool ACC, typename V, typename A, typename w_t>
inline V step_synapses(const SweepRow<A, w_t>& S, int64_t k, int64_t x, const V& p, const V& q, const V& r,
                       const V& d, const V& wo, V* before, V* after) {
  V c0{}, c1{};
  if constexpr (ACC) {
    c0 = ld<V, A>(S.acc0[k] + x);
    c1 = ld<V, A>(S.acc1[k] + x);
  }
  synapse_terms<MULT>(S.w_min, S.w_max, p, q, r, ld<V, A>(S.xn[k] + x), ld<V, A>(S.zn[k] + x),
                      ld<V, A>(S.yn[k] + x), &c0, &c1);
  V wn = wo + c0 + (c1 - d) * wo;
  if constexpr (LIVE) {
    const auto on = ld<V, A>(S.live[k] + x) > 0;
    wn = on ? wn : wo;
    if constexpr (NORM) {
      *before += on ? vabs(wo) : V{};  // a select: a masked NaN stays out
      *after += on ? vabs(wn) : V{};
    } else {
      st<V, A>(S.w[k] + x, on ? vclamp(wn, V{} + S.w_min, V{} + S.w_max) : wo);
    }
  } else if constexpr (NORM) {
    *before += vabs(wo);
    *after += vabs(wn);
  } else {
    st<V, A>(S.w[k] + x, vclamp(wn, V{} + S.w_min, V{} + S.w_max));
  }
  return wn;
}

// NORM's store of offset k: clamp(wn · scale) where the synapse is live.
template <bool LIVE, typename V, typename A, typename w_t>
inline void store_scaled(const SweepRow<A, w_t>& S, int64_t k, int64_t x, const V& wn, const V& scale) {
  const V out = vclamp(wn * scale, V{} + S.w_min, V{} + S.w_max);
  if constexpr (LIVE) {
    st<V, A>(S.w[k] + x, ld<V, A>(S.live[k] + x) > 0 ? out : wn);
  } else {
    st<V, A>(S.w[k] + x, out);
  }
}

// The cells [x, x + lanes of V) of a row, all offsets, one after another
// (any stencil; offsets whose row is missing skipped); with NORM the updated
// weights wait in a K-vector scratch until the cells' scales are known.
template <bool MULT, bool NORM, bool LIVE, bool ACC, typename V, typename A, typename w_t>
inline void sweep_cells(const SweepRow<A, w_t>& S, int64_t x) {
  constexpr int64_t L = sizeof(V) / sizeof(A);
  const V p = ld<V, A>(S.p + x), q = ld<V, A>(S.q + x), r = ld<V, A>(S.r + x), d = ld<V, A>(S.d + x);
  V before{}, after{};
  for (int64_t k = 0; k < S.K; ++k) {
    if (S.w[k] == nullptr) continue;
    w_t* p_w = S.w[k] + x;
    // the same cells of the next rows: K streams of w would outrun the
    // hardware prefetchers. Into L2 for reading (a write-intent prefetch into
    // L1 stalled on the L1 miss buffers: ~5% slower at 128³)
    __builtin_prefetch(p_w + S.prefetch, 0, 2);
    const V wn = step_synapses<MULT, NORM, LIVE, ACC, V>(S, k, x, p, q, r, d, ld<V, A>(p_w), &before, &after);
    if constexpr (NORM) st<V, A>(S.scratch + k * L, wn);
  }
  if constexpr (NORM) {
    const V scale = normalize_scale(before, after, ld<V, A>(S.upd + x));
    for (int64_t k = 0; k < S.K; ++k) {
      if (S.w[k] != nullptr) store_scaled<LIVE, V>(S, k, x, ld<V, A>(S.scratch + k * L), scale);
    }
  }
}

// sweep_cells for a stencil of KT offsets whose rows all exist (moore, 26):
// the KT vectors of w are loaded first, all at once (KT independent misses
// in flight instead of one per loop trip), updated in registers and stored
// after the scale — no scratch, no prefetch (it only competed with these
// loads). The same arithmetic in the same order as sweep_cells.
template <int KT, bool MULT, bool NORM, bool LIVE, bool ACC, typename V, typename A, typename w_t>
inline void sweep_cells_fixed(const SweepRow<A, w_t>& S, int64_t x) {
  const V p = ld<V, A>(S.p + x), q = ld<V, A>(S.q + x), r = ld<V, A>(S.r + x), d = ld<V, A>(S.d + x);
  V wv[KT];
#pragma GCC unroll 32
  for (int k = 0; k < KT; ++k) wv[k] = ld<V, A>(S.w[k] + x);
  V before{}, after{};
#pragma GCC unroll 32
  for (int k = 0; k < KT; ++k) {
    wv[k] = step_synapses<MULT, NORM, LIVE, ACC, V>(S, k, x, p, q, r, d, wv[k], &before, &after);
  }
  if constexpr (NORM) {
    const V scale = normalize_scale(before, after, ld<V, A>(S.upd + x));
#pragma GCC unroll 32
    for (int k = 0; k < KT; ++k) store_scaled<LIVE, V>(S, k, x, wv[k], scale);
  }
}

// The cells [x0, x1) of a row: SIMD vectors of cells, then the remaining
// cells one by one. Not inlined: sweep_row_any calls it up to three times a
// row, and one copy of each flag combination is what the compile time allows.
template <bool MULT, bool NORM, bool LIVE, bool ACC, typename A, typename w_t>
__attribute__((noinline)) void sweep_row(const SweepRow<A, w_t>& S, int64_t x0, int64_t x1) {
  using V = typename Simd<A>::type;
  constexpr int64_t L = sizeof(V) / sizeof(A);
  int64_t x = x0;
  // fp16/bf16 weights with fp64 state run cell by cell (a rare pairing, and
  // GCC 12's SLP vectoriser crashes on its vector form)
  constexpr bool vector = !(std::is_same_v<A, double> && sizeof(w_t) == 2);
  if constexpr (vector) {
    constexpr int kMoore = 26;
    const bool fixed = S.K == kMoore && std::none_of(S.w, S.w + S.K, [](const w_t* p) { return p == nullptr; });
    if (fixed) {
      for (; x + L <= x1; x += L) sweep_cells_fixed<kMoore, MULT, NORM, LIVE, ACC, V>(S, x);
    } else {
      for (; x + L <= x1; x += L) sweep_cells<MULT, NORM, LIVE, ACC, V>(S, x);
    }
  }
  for (; x < x1; ++x) sweep_cells<MULT, NORM, LIVE, ACC, A>(S, x);
}

// f(std::bool_constant<a>, ...) for four run-time flags.
template <typename F>
inline void with_flags(bool a, bool b, bool c, bool d, F&& f) {
  auto pick = [](bool v, auto&& g) {
    if (v) {
      g(std::true_type{});
    } else {
      g(std::false_type{});
    }
  };
  pick(a, [&](auto A_) {
    pick(b, [&](auto B_) { pick(c, [&](auto C_) { pick(d, [&](auto D_) { f(A_, B_, C_, D_); }); }); });
  });
}

// A whole row with the sweep compiled for the flags. With LIVE, the cells
// [live_lo, live_hi) have every synapse live (a zero x boundary without a
// mask: all but the reach_x cells at each end): the whole SIMD vectors in
// there run the sweep without the liveness test, the row's ends with it.
template <typename A, typename w_t>
void sweep_row_any(bool mult, bool norm, bool live, bool acc, const SweepRow<A, w_t>& S, int64_t live_lo,
                   int64_t live_hi) {
  constexpr int64_t L = sizeof(typename Simd<A>::type) / sizeof(A);
  int64_t a = 0, b = 0;  // the whole vectors inside [live_lo, live_hi)
  if (live) {
    a = std::min(S.W, (live_lo + L - 1) / L * L);
    b = live_hi > a ? a + (live_hi - a) / L * L : a;
  }
  with_flags(mult, norm, acc, false, [&](auto M, auto N, auto C, auto) {
    constexpr bool m_ = decltype(M)::value, n_ = decltype(N)::value, c_ = decltype(C)::value;
    if (!live) {
      sweep_row<m_, n_, false, c_>(S, 0, S.W);
    } else if (b > a) {
      sweep_row<m_, n_, true, c_>(S, 0, a);
      sweep_row<m_, n_, false, c_>(S, a, b);
      sweep_row<m_, n_, true, c_>(S, b, S.W);
    } else {
      sweep_row<m_, n_, true, c_>(S, 0, S.W);
    }
  });
}

// accumulate_row for run-time flags.
template <typename A>
inline void accumulate_row_any(bool mult, bool first, int64_t W, A w_min, A w_max, const A* p, const A* q,
                               const A* r, const A* xn, const A* zn, const A* yn, A* acc0, A* acc1) {
  if (mult) {
    if (first) {
      accumulate_row<true, true>(W, w_min, w_max, p, q, r, xn, zn, yn, acc0, acc1);
    } else {
      accumulate_row<true, false>(W, w_min, w_max, p, q, r, xn, zn, yn, acc0, acc1);
    }
  } else if (first) {
    accumulate_row<false, true>(W, w_min, w_max, p, q, r, xn, zn, yn, acc0, acc1);
  } else {
    accumulate_row<false, false>(W, w_min, w_max, p, q, r, xn, zn, yn, acc0, acc1);
  }
}

constexpr int64_t kPrefetchRows = 2;  // rows ahead (w in sweep_row, the fields in prefetch_fields)

// Into L2: the W cells of a row of a field.
template <typename A>
inline void prefetch_row(const A* p, int64_t W) {
  for (int64_t x = 0; x < W; x += int64_t(64 / sizeof(A))) __builtin_prefetch(p + x, 0, 2);
}

// Into L2: the neighbour rows of `row` (built into nb) that the padded-row
// caches will not hold yet — those one y further (dy > 0) — of B samples of
// a field. They are short streams in several planes that the hardware
// prefetchers pick up late.
template <typename A>
inline void prefetch_new_rows(const Lattice& L, const RowNeighbours& nb, const A* field, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    for (size_t s = 0; s < nb.rows.size(); ++s) {
      if (nb.rows[s] >= 0 && nb.shift_dy[s] > 0) prefetch_row(field + b * L.N + nb.rows[s] * L.W, L.W);
    }
  }
}

// The per-cell inputs of the fused step, all in the accumulation type A;
// x_post and θ are updated in place by the row that owns the cell.
template <typename A>
struct CellFields {
  int64_t B;
  const A *y, *spikes, *x_pre;
  A *x_post, *theta;
  const A *gate, *lr;
};

/// The fused step's sweep over w (plasticity_pass.h); instantiated for the
/// (w_t, A) pairs of plasticity.cpp in the plasticity_*.cpp files, so that
/// they compile in parallel.
template <typename w_t, typename A>
void plasticity_pass(const Lattice& L, const PlasticityParams P, w_t* w, const bool* m, const CellFields<A> F);

}  // namespace cpu
}  // namespace cellkern
