// Row tiles of the channel-mixing CPU kernels (SPEC §11): register-blocked
// sums over one vector of cells of a lattice row, vectorised along x.
//
// Every tile holds a block of accumulators in registers — OT output channels
// × BT samples (mix_tile) or OT × CT channel pairs (outer_tile) — while the
// contraction streams past, so each weight vector is loaded once for BT (or
// CT) FMAs and each state vector once for OT. A tile is one SIMD vector of
// cells (V) or one cell (V = T) for the ragged end of a row.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cellkern {
namespace cpu {
namespace mixing {

template <int N>
using IC = std::integral_constant<int, N>;

// The native vector (64 bytes with AVX-512, else 32: the accumulator blocks
// are sized for the register file) and the accumulators a tile may hold.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kAccRegs = 24;
#else
constexpr int kVecBytes = 32;
constexpr int kAccRegs = 12;
#endif

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes), aligned(sizeof(T))));
};
template <typename T>
using vec_t = typename Vec<T>::type;

/// Cells of a tile: the vector's lanes, or 1 for a scalar tile (V = T).
template <typename V, typename T>
constexpr int64_t lanes() {
  return int64_t(sizeof(V) / sizeof(T));
}

template <typename V, typename T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

/// A vector of T (the accumulation type) from weights stored as w_t.
template <typename V, typename T, typename w_t>
inline V wload(const w_t* p) {
  constexpr int64_t L = lanes<V, T>();
  if constexpr (std::is_same_v<w_t, T>) {
    return vload<V>(p);
  } else {
#if defined(__AVX512F__)
    if constexpr (L == 16 && std::is_same_v<T, float> && std::is_same_v<w_t, at::Half>) {
      const __m512 r = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return vload<V>(reinterpret_cast<const float*>(&r));
    } else if constexpr (L == 16 && std::is_same_v<T, float> && std::is_same_v<w_t, at::BFloat16>) {
      const __m512i r =
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
      return vload<V>(reinterpret_cast<const float*>(&r));
    }
#endif
    T tmp[L];
    for (int64_t l = 0; l < L; ++l) tmp[l] = static_cast<T>(p[l]);
    return vload<V>(tmp);
  }
}

/// Stores a vector of T as w_t (rounded to nearest even, as torch casts).
template <typename V, typename T, typename w_t>
inline void wstore(w_t* p, const V& v) {
  constexpr int64_t L = lanes<V, T>();
  if constexpr (std::is_same_v<w_t, T>) {
    vstore(p, v);
  } else {
#if defined(__AVX512F__)
    if constexpr (L == 16 && std::is_same_v<T, float> && std::is_same_v<w_t, at::Half>) {
      __m512 r;
      std::memcpy(&r, &v, 64);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
      return;
    }
#endif
    T tmp[L];
    vstore(tmp, v);
    for (int64_t l = 0; l < L; ++l) p[l] = static_cast<w_t>(tmp[l]);
  }
}

/// Tiles over a row of W cells: f(V{}, x) for each whole vector, then
/// f(T{}, x) for each remaining cell (tiles never overlap: the Hebbian step
/// updates in place).
template <typename T, typename F>
inline void x_tiles(int64_t W, F&& f) {
  using V = vec_t<T>;
  constexpr int64_t L = lanes<V, T>();
  int64_t x = 0;
  for (; x + L <= W; x += L) f(V{}, x);
  for (; x < W; ++x) f(T{}, x);
}

/// f(IC<OT>{}, o0) over the channels [0, C) in groups of 8, then 4, 2, 1.
template <typename F>
inline void channel_groups(int64_t C, F&& f) {
  int64_t o = 0;
  for (; o + 8 <= C; o += 8) f(IC<8>{}, o);
  if (o + 4 <= C) {
    f(IC<4>{}, o);
    o += 4;
  }
  if (o + 2 <= C) {
    f(IC<2>{}, o);
    o += 2;
  }
  if (o < C) f(IC<1>{}, o);
}

/// The second blocking dimension beside OT accumulators: as many as the
/// register budget allows (at most 8).
template <int OT>
constexpr int partner_max() {
  return std::max(1, std::min(8, kAccRegs / OT));
}

/// f(IC<BT>{}, b0) over [0, n) in groups of BMAX, then 2, then 1.
template <int BMAX, typename F>
inline void partner_groups(int64_t n, F&& f) {
  int64_t b = 0;
  for (; b + BMAX <= n; b += BMAX) f(IC<BMAX>{}, b);
  if constexpr (BMAX > 2) {
    for (; b + 2 <= n; b += 2) f(IC<2>{}, b);
  }
  for (; b < n; ++b) f(IC<1>{}, b);
}

/// The terms of a tile sum: per term t a weight base pw[t] (the plane of its
/// offset at the term's row, cell 0) and a source base ps[t] (sample 0,
/// channel 0, already shifted to the term's neighbour: cell x reads ps[t][x]).
template <typename T, typename w_t>
struct Terms {
  const w_t* const* pw;
  const T* const* ps;
  int64_t nt;
  int64_t ss;  // source stride between (sample, channel) rows
};

/// out[o, b][x..] = Σ_t Σ_j w[t, o0+o, j][x..] · src[t, b0+b, j][x..] for o < OT,
/// b < BT: the weight of output o and contraction index j lies in plane
/// (o·so_out + j·so_ctr) of the term's base, the source of (b, j) in row
/// b·n_ctr + j. Forward: o = C_out, j = C_in (so_out = C_in, so_ctr = 1);
/// transposed: o = C_in, j = C_out (so_out = 1, so_ctr = C_in). accumulate
/// adds to out instead of overwriting it.
template <int OT, int BT, typename V, typename T, typename w_t>
inline void mix_tile(const Terms<T, w_t>& tm, int64_t n_ctr, int64_t so_out, int64_t so_ctr, int64_t N, int64_t o0,
                     int64_t b0, int64_t x, T* out, int64_t os_o, int64_t os_b, bool accumulate) {
  V acc[OT][BT];
  for (int o = 0; o < OT; ++o)
    for (int b = 0; b < BT; ++b) acc[o][b] = accumulate ? vload<V>(out + o * os_o + b * os_b + x) : V{};
  const int64_t step_o = so_out * N, step_j = so_ctr * N;
  for (int64_t t = 0; t < tm.nt; ++t) {
    const w_t* p_wt = tm.pw[t] + o0 * step_o + x;
    const T* p_st = tm.ps[t] + b0 * n_ctr * tm.ss + x;
    for (int64_t j = 0; j < n_ctr; ++j) {
      V sv[BT];
      for (int b = 0; b < BT; ++b) sv[b] = vload<V>(p_st + (b * n_ctr + j) * tm.ss);
      const w_t* p_wj = p_wt + j * step_j;
      for (int o = 0; o < OT; ++o) {
        const V wv = wload<V, T>(p_wj + o * step_o);
        for (int b = 0; b < BT; ++b) acc[o][b] += wv * sv[b];
      }
    }
  }
  for (int o = 0; o < OT; ++o)
    for (int b = 0; b < BT; ++b) vstore(out + o * os_o + b * os_b + x, acc[o][b]);
}

/// acc[o][c] = Σ_b g[b, o0+o][x..] · src[b, c0+c][x..] (the outer products of
/// the weight gradient and the Hebbian term): g rows at pg + (b·Co + o)·gs,
/// source rows at ps + (b·Ci + c)·ss.
template <int OT, int CT, typename V, typename T>
inline void outer_tile(const T* pg, int64_t gs, const T* ps, int64_t ss, int64_t B, int64_t Co, int64_t Ci,
                       int64_t o0, int64_t c0, int64_t x, V (&acc)[OT][CT]) {
  for (int o = 0; o < OT; ++o)
    for (int c = 0; c < CT; ++c) acc[o][c] = V{};
  for (int64_t b = 0; b < B; ++b) {
    V gv[OT];
    for (int o = 0; o < OT; ++o) gv[o] = vload<V>(pg + (b * Co + o0 + o) * gs + x);
    for (int c = 0; c < CT; ++c) {
      const V sv = vload<V>(ps + (b * Ci + c0 + c) * ss + x);
      for (int o = 0; o < OT; ++o) acc[o][c] += gv[o] * sv;
    }
  }
}

}  // namespace mixing
}  // namespace cpu
}  // namespace cellkern
