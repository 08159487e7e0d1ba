// Row primitives of the CPU gather kernels: sums over the stencil's terms
// for one lattice row (a weight row times a shifted state row per term),
// vectorised along x, with the wrap / zero handling of the row's edge cells.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../stencil.h"

namespace cellkern {
namespace cpu {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- row primitives ----

// A 64-byte vector of the accumulation type (GCC/Clang vector extension: the
// compiler maps it onto whatever SIMD width -march allows).
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(64), aligned(4)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(64), aligned(8)));
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// One product term of a row sum: a[x + da] · b[x + db].
// Where a term reads at an edge cell xe: a = x + da, b = x + db, wrapped
// along a periodic x axis (one compare when `near`, i.e. every shift is
// shorter than the row). False when either leaves a zero boundary.
inline bool edge_indices(int64_t xe, int64_t da, int64_t db, int64_t W, bool periodic, bool near, int64_t* xa,
                         int64_t* xb) {
  *xa = xe + da;
  *xb = xe + db;
  if (periodic) {
    *xa = near ? wrap_once(*xa, W) : wrap(*xa, W);
    *xb = near ? wrap_once(*xb, W) : wrap(*xb, W);
    return true;
  }
  return inside(*xa, W) && inside(*xb, W);
}

template <typename T>
struct Term {
  const T* a;
  const T* b;
  int64_t da, db;
};

// out[x0 .. x0 + U·L) = Σ_t pa_t[x0 ..]·pb_t[x0 ..]: U vectors held in registers
// while the terms stream past.
template <bool accumulate, int U, typename T>
inline void dot_block(T* __restrict out, const T* const* pa, const T* const* pb, int64_t nt, int64_t x0) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  V r[U];
  for (int u = 0; u < U; ++u) r[u] = accumulate ? load<V>(out + x0 + u * L) : V{};
  for (int64_t t = 0; t < nt; ++t) {
    const T* p_a = pa[t] + x0;
    const T* p_b = pb[t] + x0;
    for (int u = 0; u < U; ++u) r[u] += load<V>(p_a + u * L) * load<V>(p_b + u * L);
  }
  for (int u = 0; u < U; ++u) store(out + x0 + u * L, r[u]);
}

// Blocks of U vectors over [x0, x1). When writing, a ragged end is covered
// by one more block ending at x1, which overlaps cells already written with
// the same sums; when accumulating it is left to the caller. Returns where
// it stopped.
template <bool accumulate, int U, typename T>
inline int64_t dot_blocks(T* out, const T* const* pa, const T* const* pb, int64_t nt, int64_t x0, int64_t x1) {
  constexpr int64_t B = U * int64_t(sizeof(typename Simd<T>::type) / sizeof(T));
  if (x1 - x0 < B) return x0;
  int64_t x = x0;
  for (; x + B <= x1; x += B) dot_block<accumulate, U>(out, pa, pb, nt, x);
  if (accumulate || x == x1) return x;
  dot_block<accumulate, U>(out, pa, pb, nt, x1 - B);
  return x1;
}

// out[x] = Σ_t a_t[x+da_t]·b_t[x+db_t] (out[x] += ... when accumulate) for
// every x of a row of W cells.
// A term whose index leaves [0, W) wraps when the x axis is periodic and is
// dropped under a zero boundary. `reach` bounds |da|, |db|: the interior
// cells [reach, W-reach) need neither test and run as SIMD blocks; only the
// `reach` cells at each end take the scalar path.
template <bool accumulate, typename T>
void row_dot(T* __restrict out, const Term<T>* terms, int64_t nt, int64_t W, int64_t reach, bool periodic,
             const T** pa, const T** pb) {
  const int64_t e1 = std::min(reach, W);
  const int64_t e2 = std::max(e1, W - reach);
  if (e2 > e1) {
    // pointers to each term's first interior cell: in bounds, so no address
    // ever points before a row
    for (int64_t t = 0; t < nt; ++t) {
      pa[t] = terms[t].a + (e1 + terms[t].da);
      pb[t] = terms[t].b + (e1 + terms[t].db);
    }
    T* o = out + e1;
    const int64_t n = e2 - e1;
    int64_t x = dot_blocks<accumulate, 4>(o, pa, pb, nt, 0, n);
    if (x < n) x = dot_blocks<accumulate, 1>(o, pa, pb, nt, x, n);
    if (x < n) {
      // a tail shorter than one vector: terms outer, cells inner, so the
      // cells still run as one (masked) vector per term
      if (!accumulate) std::fill(o + x, o + n, T(0));
      for (int64_t t = 0; t < nt; ++t) {
        const T* __restrict p_a = pa[t];
        const T* __restrict p_b = pb[t];
#pragma omp simd
        for (int64_t xx = x; xx < n; ++xx) o[xx] += p_a[xx] * p_b[xx];
      }
    }
  }
  const bool near = reach < W;  // every index is within one period of [0, W)
  auto edge = [&](int64_t x0, int64_t x1) {
    for (int64_t xe = x0; xe < x1; ++xe) {
      T r = accumulate ? out[xe] : T(0);
      for (int64_t t = 0; t < nt; ++t) {
        int64_t xa, xb;
        if (!edge_indices(xe, terms[t].da, terms[t].db, W, periodic, near, &xa, &xb)) continue;
        r += terms[t].a[xa] * terms[t].b[xb];
      }
      out[xe] = r;
    }
  };
  edge(0, e1);
  edge(e2, W);
}

// Rows no longer than one 64-byte vector (W ≤ 16 floats / 8 doubles), with
// AVX-512: each row is one masked register load and every shifted read a lane
// permutation (wrapped, or zeroed past a zero boundary), so the whole row,
// edges included, runs in registers. Returns false (caller takes the generic
// path) where it does not apply.
#if defined(__AVX512F__)
template <typename T>
struct Short;
template <>
struct Short<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t L = 16;
  static V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512i index(const int64_t* ix) {
    alignas(64) int32_t i32[16];
    for (int l = 0; l < 16; ++l) i32[l] = static_cast<int32_t>(ix[l]);
    return _mm512_load_si512(i32);
  }
  static V perm(__m512i ix, V v, M m) { return _mm512_maskz_permutexvar_ps(m, ix, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V zero() { return _mm512_setzero_ps(); }
  static void store(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
};
template <>
struct Short<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int64_t L = 8;
  static V load(const double* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  static __m512i index(const int64_t* ix) { return _mm512_loadu_si512(ix); }
  static V perm(__m512i ix, V v, M m) { return _mm512_maskz_permutexvar_pd(m, ix, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V zero() { return _mm512_setzero_pd(); }
  static void store(double* p, M m, V v) { _mm512_mask_storeu_pd(p, m, v); }
};

template <int NB, typename T>
inline bool short_row(T* __restrict out, int64_t ostride, const Term<T>* terms, int64_t nt, int64_t W,
                      int64_t reach, bool periodic) {
  using S = Short<T>;
  using V = typename S::V;
  using M = typename S::M;
  constexpr int64_t L = S::L;
  constexpr int64_t kMaxReach = 7;
  if (W > L || reach > kMaxReach) return false;
  // per shift d in [-reach, reach]: lane x reads x + d (wrapped), valid mask
  alignas(64) int64_t idx[2 * kMaxReach + 1][L];
  M valid[2 * kMaxReach + 1];
  for (int64_t d = -reach; d <= reach; ++d) {
    uint32_t m = 0;
    for (int64_t x = 0; x < L; ++x) {
      int64_t xs = x + d;
      bool ok = x < W;
      if (periodic) {
        xs = wrap(xs, W);
      } else {
        ok = ok && inside(xs, W);
      }
      idx[d + reach][x] = ok ? xs : 0;
      if (ok) m |= uint32_t(1) << x;
    }
    valid[d + reach] = static_cast<M>(m);
  }
  // the index vectors as registers, once per shift
  __m512i iv[2 * kMaxReach + 1];
  for (int64_t d = 0; d <= 2 * reach; ++d) iv[d] = S::index(idx[d]);
  const M wm = static_cast<M>((uint32_t(1) << W) - 1);
  V acc[NB];
  for (int c = 0; c < NB; ++c) acc[c] = S::zero();
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t sa = terms[t].da + reach, sb = terms[t].db + reach;
    const M m = static_cast<M>(valid[sa] & valid[sb]);
    const V a = S::perm(iv[sa], S::load(terms[t].a, wm), m);
    for (int c = 0; c < NB; ++c) {
      acc[c] = S::fma(a, S::perm(iv[sb], S::load(terms[c * nt + t].b, wm), m), acc[c]);
    }
  }
  for (int c = 0; c < NB; ++c) S::store(out + c * ostride, wm, acc[c]);
  return true;
}
#else
template <int NB, typename T>
inline bool short_row(T*, int64_t, const Term<T>*, int64_t, int64_t, int64_t, bool) {
  return false;
}
#endif

// NB channels at once: out_c[x] = Σ_t a_t[x]·b_{c,t}[x] for c < NB, each weight
// vector loaded once and used for NB FMAs. pb holds NB groups of nt pointers.
template <int NB, int U, typename T>
inline void dot_block_multi(T* __restrict out, int64_t ostride, const T* const* pa, const T* const* pb, int64_t nt,
                            int64_t x0) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  V r[NB][U];
  for (int c = 0; c < NB; ++c)
    for (int u = 0; u < U; ++u) r[c][u] = V{};
  for (int64_t t = 0; t < nt; ++t) {
    const T* p_a = pa[t] + x0;
    for (int u = 0; u < U; ++u) {
      const V va = load<V>(p_a + u * L);
      for (int c = 0; c < NB; ++c) r[c][u] += va * load<V>(pb[c * nt + t] + x0 + u * L);
    }
  }
  for (int c = 0; c < NB; ++c)
    for (int u = 0; u < U; ++u) store(out + c * ostride + x0 + u * L, r[c][u]);
}

template <int NB, int U, typename T>
inline int64_t dot_blocks_multi(T* out, int64_t ostride, const T* const* pa, const T* const* pb, int64_t nt,
                                int64_t x0, int64_t x1) {
  constexpr int64_t B = U * int64_t(sizeof(typename Simd<T>::type) / sizeof(T));
  if (x1 - x0 < B) return x0;
  int64_t x = x0;
  for (; x + B <= x1; x += B) dot_block_multi<NB, U>(out, ostride, pa, pb, nt, x);
  if (x == x1) return x;
  dot_block_multi<NB, U>(out, ostride, pa, pb, nt, x1 - B);
  return x1;
}

// row_dot (writing) for NB channels sharing the a side of every term:
// terms holds NB groups of nt terms (group c for channel c, the same a/da in
// every group); channel c's row goes to out + c·ostride.
template <int NB, typename T>
void row_dot_multi(T* __restrict out, int64_t ostride, const Term<T>* terms, int64_t nt, int64_t W, int64_t reach,
                   bool periodic, const T** pa, const T** pb) {
  if (short_row<NB>(out, ostride, terms, nt, W, reach, periodic)) return;
  const int64_t e1 = std::min(reach, W);
  const int64_t e2 = std::max(e1, W - reach);
  if (e2 > e1) {
    for (int64_t t = 0; t < nt; ++t) pa[t] = terms[t].a + (e1 + terms[t].da);
    for (int64_t t = 0; t < NB * nt; ++t) pb[t] = terms[t].b + (e1 + terms[t].db);
    T* o = out + e1;
    const int64_t n = e2 - e1;
    int64_t x = 0;
    if constexpr (NB <= 4) x = dot_blocks_multi<NB, 4>(o, ostride, pa, pb, nt, x, n);
    if (x < n) x = dot_blocks_multi<NB, 2>(o, ostride, pa, pb, nt, x, n);
    if (x < n) x = dot_blocks_multi<NB, 1>(o, ostride, pa, pb, nt, x, n);
    if (x < n) {
      for (int c = 0; c < NB; ++c) std::fill(o + c * ostride + x, o + c * ostride + n, T(0));
      for (int64_t t = 0; t < nt; ++t) {
        const T* __restrict p_a = pa[t];
        for (int c = 0; c < NB; ++c) {
          const T* __restrict p_b = pb[c * nt + t];
          T* __restrict oc = o + c * ostride;
#pragma omp simd
          for (int64_t xx = x; xx < n; ++xx) oc[xx] += p_a[xx] * p_b[xx];
        }
      }
    }
  }
  const bool near = reach < W;
  auto edge = [&](int64_t x0, int64_t x1) {
    for (int64_t xe = x0; xe < x1; ++xe) {
      T r[NB];
      for (int c = 0; c < NB; ++c) r[c] = T(0);
      for (int64_t t = 0; t < nt; ++t) {
        int64_t xa, xb;
        if (!edge_indices(xe, terms[t].da, terms[t].db, W, periodic, near, &xa, &xb)) continue;
        const T va = terms[t].a[xa];
        for (int c = 0; c < NB; ++c) r[c] += va * terms[c * nt + t].b[xb];
      }
      for (int c = 0; c < NB; ++c) out[c * ostride + xe] = r[c];
    }
  };
  edge(0, e1);
  edge(e2, W);
}

// Rows of a [BC, D, H, W] tensor in the accumulation type: the tensor's own
// rows when it already has that type, else copies converted on first use
// (fp16/bf16), valid until clear().
template <typename scalar_t>
class RowSource {
 public:
  using acc_t = acc_type<scalar_t>;
  RowSource(const scalar_t* base, int64_t N, int64_t W, int64_t capacity) : base_(base), N_(N), W_(W) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      buf_.resize(capacity * W);
      keys_.reserve(capacity);
    }
  }
  void clear() { keys_.clear(); }
  const acc_t* row(int64_t bc, int64_t r) {
    const scalar_t* p = base_ + bc * N_ + r * W_;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return p;
    } else {
      for (size_t i = 0; i < keys_.size(); ++i) {
        if (keys_[i] == p) return buf_.data() + i * W_;
      }
      TORCH_CHECK(static_cast<int64_t>(keys_.size() + 1) * W_ <= static_cast<int64_t>(buf_.size()),
                  "cellkern_cpu: row cache overflow");
      acc_t* dst = buf_.data() + keys_.size() * W_;
      keys_.push_back(p);
#pragma omp simd
      for (int64_t x = 0; x < W_; ++x) dst[x] = static_cast<acc_t>(p[x]);
      return dst;
    }
  }

 private:
  const scalar_t* base_;
  int64_t N_, W_;
  std::vector<acc_t> buf_;
  std::vector<const scalar_t*> keys_;
};

// The effective weight row m[k,r]·w[k,r] in the accumulation type: w's own
// row when no conversion or mask is needed, else a copy in `buf`.
template <typename scalar_t, typename acc_t>
inline const acc_t* weight_row(const scalar_t* p_w, const bool* p_m, int64_t W, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (p_m == nullptr) return p_w;
  }
  if (p_m == nullptr) {
#pragma omp simd
    for (int64_t x = 0; x < W; ++x) buf[x] = static_cast<acc_t>(p_w[x]);
  } else {
#pragma omp simd
    for (int64_t x = 0; x < W; ++x) buf[x] = static_cast<acc_t>(p_w[x]) * static_cast<acc_t>(p_m[x]);
  }
  return buf;
}

}  // namespace cpu
}  // namespace cellkern
