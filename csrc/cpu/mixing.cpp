// Fused CPU kernels of the channel-mixing (locally connected) form, SPEC §11.
// w is [K, C_out, C_in, D, H, W] (each (k, o, c) plane contiguous over cells),
// mask [K, D, H, W], s [B, C_in, D, H, W]:
//
//   aggregate   a[b,o,i]    = Σ_k m[k,i] · Σ_c W[k,o,c,i] · s[b,c,nbr(i,k)]
//   transposed  ds[b,c,j]   = Σ_k m[k,j−o_k] · Σ_o W[k,o,c,j−o_k] · g[b,o,j−o_k]
//   weight grad dW[k,o,c,i] = m[k,i] · Σ_b g[b,o,i] · s[b,c,nbr(i,k)]
//   propagate   s'          = (1−α)·s + α·φ(a + x + bias)   (φ also "triangle")
//   competitive Hebbian     u = a, p = softmax_o((u + β)/τ),
//               ΔW[k,o,c,i] = η/n[o,i] · Σ_b p[b,o,i]·(s[b,c,nbr(i,k)] − u[b,o,i]·W[k,o,c,i]),
//               β ← β − η_β·(mean_b p − 1/C_out)
//
// Every pass is parallel over lattice rows (z, y); a thread owns whole rows
// of its outputs, so nothing needs atomics. Per row, the state rows the
// stencil reads (one per distinct (dz, dy)) are staged once, converted to the
// accumulation type and padded along x with the wrapped (periodic) or zero
// cells, so that every offset's neighbour row is a plain shifted pointer; a
// mask is folded into per-offset copies of them. The sums then run as
// register tiles (mixing_rows.h) over vectors of cells: the weight rows
// W[k,o,c,row] are contiguous along x and read once per row (B = 1: streamed
// from memory; B > 1: packed, then reused from cache for every
// group of samples). The transposed sum mixes g back through Wᵀ at the source
// cell (aligned, no shift) and shifts the result, so it costs what the
// forward costs. The Hebbian step reads a row's weights for u, then updates
// them while they are still in L2: one read and one write of W from memory.
//
// Precision: fp16/bf16 converted on load, sums in fp32 (fp64 for fp64),
// results rounded once to the output dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../stencil.h"
#include "activations.h"
#include "dispatch.h"
#include "lattice.h"
#include "mixing_rows.h"
#include "rows.h"

namespace cellkern {
namespace cpu {
namespace {

using namespace mixing;


// exp(x) for x ≤ 0 (softmax arguments after the max is taken): Cephes' expf,
// branch-free so that `omp simd` loops vectorise it (a few ulp).
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_neg(double x) { return std::exp(x); }

/// The sizes of a mixing op.
struct Mix {
  Lattice L;  // L.BC = B·C_in planes of s, L.C = C_in
  int64_t B, Ci, Co;
};

Mix make_mix(const at::Tensor& s, const at::Tensor& w, const at::Tensor& offsets, const c10::List<bool>& periodic) {
  TORCH_CHECK(s.dim() == 5, "cellkern_cpu: s must be [B, C_in, D, H, W], got ", s.sizes());
  TORCH_CHECK(w.dim() == 6, "cellkern_cpu: w must be [K, C_out, C_in, D, H, W], got ", w.sizes());
  Mix M;
  M.L = make_lattice(s.size(0), s.size(1), s.size(2), s.size(3), s.size(4), offsets, periodic);
  M.B = s.size(0);
  M.Ci = s.size(1);
  M.Co = w.size(1);
  TORCH_CHECK(w.size(0) == M.L.K && w.size(2) == M.Ci && w.size(3) == M.L.D && w.size(4) == M.L.H &&
                  w.size(5) == M.L.W,
              "cellkern_cpu: w must be [K, C_out, C_in, D, H, W] with K = ", M.L.K, ", C_in = ", M.Ci, " and dims ",
              M.L.D, "x", M.L.H, "x", M.L.W, ", got ", w.sizes());
  return M;
}

// Rows per parallel task: about 64k multiply-adds each.
int64_t row_grain(const Mix& M) {
  const int64_t per_row = std::max<int64_t>(1, M.L.K * M.Co * M.Ci * M.L.W * std::max<int64_t>(1, M.B));
  return std::max<int64_t>(1, 65536 / per_row);
}

/// The R cells before and after a row of W (dst[-R .. -1], dst[W .. W+R-1]):
/// the wrapped cells at(x) of the row when periodic, else 0.
template <typename T, typename At>
inline void pad_edges(T* dst, int64_t W, int64_t R, bool periodic, At at) {
  if (!periodic) {
    std::fill(dst - R, dst, T(0));
    std::fill(dst + W, dst + W + R, T(0));
  } else if (R <= W) {  // one wrap, no division
    for (int64_t i = 1; i <= R; ++i) {
      dst[-i] = at(W - i);
      dst[W - 1 + i] = at(i - 1);
    }
  } else {
    for (int64_t i = 1; i <= R; ++i) {
      dst[-i] = at(wrap(-i, W));
      dst[W - 1 + i] = at(wrap(W - 1 + i, W));
    }
  }
}

/// One thread's view of a lattice row: the stencil terms whose neighbour row
/// exists, and the staged, x-padded (and, with a mask, masked) source rows.
template <typename T>
struct RowTerms {
  const Lattice& L;
  int64_t R, Wp;                   // x padding (the stencil's reach) and padded row length
  std::vector<int64_t> k, nr, dx;  // per live term: offset, neighbour row, x shift
  std::vector<int64_t> rows;       // distinct neighbour rows
  std::vector<int64_t> slot;       // per live term: its row in `rows`
  std::vector<T> pad, masked, valid;
  std::vector<const T*> ps;
  int64_t ss = 0;

  explicit RowTerms(const Lattice& lat) : L(lat), R(lat.reach_x), Wp(lat.W + 2 * lat.reach_x) {}

  /// The live terms of row `row` (sign −1: the transposed stencil, −o_k).
  void terms(int64_t row, int64_t sign) {
    const int64_t z = row / L.H, y = row % L.H;
    k.clear();
    nr.clear();
    dx.clear();
    rows.clear();
    slot.clear();
    for (int64_t kk = 0; kk < L.K; ++kk) {
      const int64_t r = nbr_row(z, y, sign * L.dz[kk], sign * L.dy[kk], L.D, L.H, L.pz, L.py);
      if (r < 0) continue;
      k.push_back(kk);
      nr.push_back(r);
      dx.push_back(sign * L.dx[kk]);
      const auto it = std::find(rows.begin(), rows.end(), r);
      slot.push_back(it - rows.begin());
      if (it == rows.end()) rows.push_back(r);
    }
  }

  int64_t nt() const { return int64_t(k.size()); }

  /// Stages the neighbour rows of `nplanes` planes of src (each N cells) and
  /// points ps[t] at term t's shifted row of plane 0 (plane p at + p·ss).
  /// With a mask, m[k, row, x]·src[nbr] per term instead.
  template <typename s_t>
  void stage(const s_t* p_src, int64_t nplanes, int64_t row, const bool* p_m) {
    const int64_t W = L.W, N = L.N, nd = int64_t(rows.size());
    pad.resize(std::max<int64_t>(1, nplanes * nd * Wp));
    for (int64_t p = 0; p < nplanes; ++p) {
      for (int64_t d = 0; d < nd; ++d) {
        const s_t* src = p_src + p * N + rows[d] * W;
        T* dst = pad.data() + (p * nd + d) * Wp + R;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<T>(src[x]);
        pad_edges(dst, W, R, L.px, [&](int64_t x) { return static_cast<T>(src[x]); });
      }
    }
    const int64_t n = nt();
    ps.resize(n);
    if (p_m == nullptr) {
      ss = nd * Wp;
      for (int64_t t = 0; t < n; ++t) ps[t] = pad.data() + slot[t] * Wp + R + dx[t];
      return;
    }
    ss = n * W;
    masked.resize(std::max<int64_t>(1, nplanes * n * W));
    for (int64_t p = 0; p < nplanes; ++p) {
      for (int64_t t = 0; t < n; ++t) {
        const T* src = pad.data() + (p * nd + slot[t]) * Wp + R + dx[t];
        const bool* p_mr = p_m + k[t] * N + row * W;
        T* dst = masked.data() + (p * n + t) * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) dst[x] = p_mr[x] ? src[x] : T(0);
      }
    }
    for (int64_t t = 0; t < n; ++t) ps[t] = masked.data() + t * W;
  }

  /// valid[t][x] = 1 where term t's synapse of cell x lives (mask, and the
  /// neighbour inside a zero x boundary), else 0. False when every one lives.
  bool live(int64_t row, const bool* p_m) {
    const int64_t W = L.W, N = L.N, n = nt();
    if (p_m == nullptr && L.px) return false;
    valid.resize(std::max<int64_t>(1, n * W));
    for (int64_t t = 0; t < n; ++t) {
      T* v = valid.data() + t * W;
      const bool* p_mr = p_m ? p_m + k[t] * N + row * W : nullptr;
      for (int64_t x = 0; x < W; ++x) {
        const bool in = L.px || inside(x + dx[t], W);
        v[x] = (in && (p_mr == nullptr || p_mr[x])) ? T(1) : T(0);
      }
    }
    return true;
  }
};

/// rows of a [P, N] tensor at `row` in T: the tensor itself when it has that
/// type (stride N), else a converted copy in buf (stride W).
template <typename T, typename g_t>
const T* rows_as(const g_t* p, int64_t nplanes, int64_t N, int64_t W, int64_t row, std::vector<T>& buf,
                 int64_t* stride) {
  if constexpr (std::is_same_v<T, g_t>) {
    *stride = N;
    return p + row * W;
  } else {
    buf.resize(std::max<int64_t>(1, nplanes * W));
    for (int64_t q = 0; q < nplanes; ++q) {
      const g_t* src = p + q * N + row * W;
      T* dst = buf.data() + q * W;
#pragma omp simd
      for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<T>(src[x]);
    }
    *stride = W;
    return buf.data();
  }
}

/// The weights of a block of rows, packed: buf holds W[k, q, r0 + r, x] (q =
/// o·C_in + c) at (k·P + q)·stride + r·W + x for every offset k, stride =
/// nr·W plus one cache line. Each plane is read as one run of nr rows (DRAM
/// pages and the hardware prefetcher like that; a row at a time, the K·P
/// planes N cells apart would share cache sets and miss), and the padding
/// keeps the packed planes off the same sets for the tiles that reread them.
template <typename T, typename w_t>
int64_t pack_block(const Mix& M, const w_t* p_w, int64_t r0, int64_t nr, std::vector<T>& buf) {
  const int64_t W = M.L.W, N = M.L.N, planes = M.L.K * M.Co * M.Ci;
  const int64_t stride = nr * W + 64 / int64_t(sizeof(T));
  buf.resize(std::max<int64_t>(1, planes * stride));
  for (int64_t q = 0; q < planes; ++q) {
    const w_t* src = p_w + q * N + r0 * W;
    T* dst = buf.data() + q * stride;
#pragma omp simd
    for (int64_t x = 0; x < nr * W; ++x) dst[x] = static_cast<T>(src[x]);
  }
  return stride;
}

/// Rows per packed block: runs of at least 2 KiB per plane (at most 16 rows).
int64_t block_rows(const Mix& M) {
  return std::max<int64_t>(1, std::min<int64_t>(16, 2048 / std::max<int64_t>(1, M.L.W * 4)));
}

/// u[b, o, x] (buffer [B, C_out, W]) = the mixing sum of row `row`, from the
/// staged sources of rt and the packed weights of its block (wp: row `row` of
/// plane 0, planes `stride` apart). The terms go in chunks whose weight rows
/// fit in L1 (16 KiB), summed into u chunk after chunk: every group of
/// samples rereads those weights from L1.
template <typename T>
void row_sum(const Mix& M, RowTerms<T>& rt, const T* wp, int64_t stride, std::vector<const T*>& pw, T* u) {
  const int64_t W = M.L.W, Co = M.Co, Ci = M.Ci, n = rt.nt(), P = Co * Ci;
  if (n == 0) {
    std::fill(u, u + M.B * Co * W, T(0));
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, (int64_t(16) << 10) / std::max<int64_t>(1, P * W * int64_t(sizeof(T))));
  pw.resize(n);
  for (int64_t t = 0; t < n; ++t) pw[t] = wp + rt.k[t] * P * stride;
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const Terms<T, T> tm{pw.data() + t0, rt.ps.data() + t0, std::min(chunk, n - t0), rt.ss};
    channel_groups(Co, [&](auto ot, int64_t o0) {
      constexpr int OT = decltype(ot)::value;
      partner_groups<partner_max<OT>()>(M.B, [&](auto bt, int64_t b0) {
        constexpr int BT = decltype(bt)::value;
        x_tiles<T>(W, [&](auto vt, int64_t x) {
          using V = decltype(vt);
          mix_tile<OT, BT, V, T, T>(tm, Ci, Ci, 1, stride, o0, b0, x, u + b0 * Co * W + o0 * W, W, Co * W, t0 > 0);
        });
      });
    });
  }
}

// For every row: u = the mixing sum (fp32/fp64, [B, C_out, W]); then epi(row, u).
template <typename T, typename s_t, typename w_t, typename Epi>
void forward_pass(const Mix& M, const s_t* p_s, const w_t* p_w, const bool* p_m, Epi epi) {
  const int64_t W = M.L.W, rows = M.L.D * M.L.H;
  at::parallel_for(0, rows, row_grain(M), [&](int64_t r0, int64_t r1) {
    RowTerms<T> rt(M.L);
    std::vector<T> u(std::max<int64_t>(1, M.B * M.Co * W));
    std::vector<T> wbuf;
    std::vector<const T*> pw;
    const int64_t R = block_rows(M);
    for (int64_t rb = r0; rb < r1; rb += R) {
      const int64_t nr = std::min(R, r1 - rb), stride = pack_block<T>(M, p_w, rb, nr, wbuf);
      for (int64_t row = rb; row < rb + nr; ++row) {
        rt.terms(row, 1);
        rt.stage(p_s, M.B * M.Ci, row, p_m);
        row_sum<T>(M, rt, wbuf.data() + (row - rb) * W, stride, pw, u.data());
        epi(row, u.data());
      }
    }
  });
}

// ds for every row: acc[b, c, x] = Σ_k (m·Wᵀg)[k, b, c, x − dx] at the source
// row of −o_k (zero where that leaves a zero boundary); then epi(row, acc).
// g is [B, C_out, D, H, W].
template <typename T, typename g_t, typename w_t, typename Epi>
void transposed_pass(const Mix& M, const g_t* p_g, const w_t* p_w, const bool* p_m, Epi epi) {
  const Lattice& L = M.L;
  const int64_t W = L.W, N = L.N, Co = M.Co, Ci = M.Ci, B = M.B, R = L.reach_x, Wp = W + 2 * R;
  at::parallel_for(0, L.D * L.H, row_grain(M), [&](int64_t r0, int64_t r1) {
    RowTerms<T> rt(L);
    std::vector<T> acc(std::max<int64_t>(1, B * Ci * W)), h(std::max<int64_t>(1, B * Ci * Wp)), gbuf, wbuf;
    for (int64_t row = r0; row < r1; ++row) {
      rt.terms(row, -1);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t t = 0; t < rt.nt(); ++t) {
        const int64_t k = rt.k[t], sr = rt.nr[t], dx = rt.dx[t];
        int64_t gs;
        const T* p_gr = rows_as<T>(p_g, B * Co, N, W, sr, gbuf, &gs);
        // the term's weights at the source row, packed (its planes share cache sets)
        wbuf.resize(std::max<int64_t>(1, Co * Ci * W));
        for (int64_t q = 0; q < Co * Ci; ++q) {
          const w_t* src = p_w + (k * Co * Ci + q) * N + sr * W;
          T* dst = wbuf.data() + q * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<T>(src[x]);
        }
        const T* pw = wbuf.data();
        const Terms<T, T> tm{&pw, &p_gr, 1, gs};
        // h[b, c, x] = Σ_o W[k, o, c, sr, x]·g[b, o, sr, x]
        x_tiles<T>(W, [&](auto vt, int64_t x) {
          using V = decltype(vt);
          channel_groups(Ci, [&](auto ct, int64_t c0) {
            constexpr int CT = decltype(ct)::value;
            partner_groups<partner_max<CT>()>(B, [&](auto bt, int64_t b0) {
              constexpr int BT = decltype(bt)::value;
              mix_tile<CT, BT, V, T, T>(tm, Co, 1, Ci, W, c0, b0, x, h.data() + (b0 * Ci + c0) * Wp + R, Wp,
                                        Ci * Wp, false);
            });
          });
        });
        const bool* p_mr = p_m ? p_m + k * N + sr * W : nullptr;
        for (int64_t q = 0; q < B * Ci; ++q) {
          T* hq = h.data() + q * Wp + R;
          if (p_mr != nullptr) {
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) hq[x] = p_mr[x] ? hq[x] : T(0);
          }
          pad_edges(hq, W, R, L.px, [&](int64_t x) { return hq[x]; });
          const T* src = hq + dx;  // dx of the transposed stencil: h at x − o_k
          T* dst = acc.data() + q * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) dst[x] += src[x];
        }
      }
      epi(row, acc.data());
    }
  });
}

// dW[k, o, c, row, x] = m · Σ_b g[b, o, row, x]·s[b, c, nbr]; 0 where the synapse does not exist.
template <typename T, typename g_t, typename s_t, typename w_t>
void weight_grad_pass(const Mix& M, const g_t* p_g, const s_t* p_s, const bool* p_m, w_t* p_dw) {
  const Lattice& L = M.L;
  const int64_t W = L.W, N = L.N, Co = M.Co, Ci = M.Ci, B = M.B;
  at::parallel_for(0, L.D * L.H, row_grain(M), [&](int64_t r0, int64_t r1) {
    RowTerms<T> rt(L);
    std::vector<T> gbuf;
    std::vector<char> live(L.K);
    for (int64_t row = r0; row < r1; ++row) {
      rt.terms(row, 1);
      rt.stage(p_s, B * Ci, row, p_m);
      int64_t gs;
      const T* p_gr = rows_as<T>(p_g, B * Co, N, W, row, gbuf, &gs);
      std::fill(live.begin(), live.end(), 0);
      for (int64_t t = 0; t < rt.nt(); ++t) {
        const int64_t k = rt.k[t];
        live[k] = 1;
        w_t* p_dk = p_dw + k * Co * Ci * N + row * W;
        x_tiles<T>(W, [&](auto vt, int64_t x) {
          using V = decltype(vt);
          channel_groups(Co, [&](auto ot, int64_t o0) {
            constexpr int OT = decltype(ot)::value;
            partner_groups<partner_max<OT>()>(Ci, [&](auto ct, int64_t c0) {
              constexpr int CT = decltype(ct)::value;
              V a[OT][CT];
              outer_tile<OT, CT, V, T>(p_gr, gs, rt.ps[t], rt.ss, B, Co, Ci, o0, c0, x, a);
              for (int o = 0; o < OT; ++o)
                for (int c = 0; c < CT; ++c) wstore<V, T>(p_dk + ((o0 + o) * Ci + c0 + c) * N + x, a[o][c]);
            });
          });
        });
      }
      for (int64_t k = 0; k < L.K; ++k) {
        if (live[k]) continue;
        for (int64_t q = 0; q < Co * Ci; ++q) {
          w_t* p = p_dw + (k * Co * Ci + q) * N + row * W;
          std::fill(p, p + W, w_t(0));
        }
      }
    }
  });
}

const bool* mask_ptr(const std::optional<at::Tensor>& mask) {
  return (mask.has_value() && mask->defined()) ? mask->data_ptr<bool>() : nullptr;
}

at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename F>
void dispatch_act5(int64_t act, F&& f) {
  if (act == kTriangle) {
    f(std::integral_constant<int64_t, kTriangle>{});
  } else {
    dispatch_act(act, f);
  }
}

// The cell update of one row: u += x + bias; out = (1−α)·s + α·φ(u); u saved.
template <int64_t ACT, typename T, typename s_t>
void cell_update_row(const Mix& M, int64_t row, T* u, const s_t* p_s, const s_t* p_x, const s_t* p_bias,
                     double leak, s_t* p_out, T* p_u) {
  const int64_t W = M.L.W, N = M.L.N, C = M.Co;
  const T alpha = static_cast<T>(leak), keep = static_cast<T>(1.0 - leak);
  for (int64_t b = 0; b < M.B; ++b) {
    for (int64_t o = 0; o < C; ++o) {
      T* ur = u + (b * C + o) * W;
      const int64_t base = (b * C + o) * N + row * W;
      if (p_x != nullptr) {
        const s_t* xr = p_x + base;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) ur[x] += static_cast<T>(xr[x]);
      }
      if (p_bias != nullptr) {
        const s_t* br = p_bias + o * N + row * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) ur[x] += static_cast<T>(br[x]);
      }
      if (p_u != nullptr) std::copy(ur, ur + W, p_u + base);
    }
    if constexpr (ACT == kTriangle) {
      std::vector<T> mean(W, T(0));
      for (int64_t o = 0; o < C; ++o) {
        const T* ur = u + (b * C + o) * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) mean[x] += ur[x];
      }
      const T inv = T(1) / static_cast<T>(C);
      for (int64_t o = 0; o < C; ++o) {
        const T* ur = u + (b * C + o) * W;
        const int64_t base = (b * C + o) * N + row * W;
        const s_t* sr = p_s + base;
        s_t* out = p_out + base;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) {
          const T v = ur[x] - mean[x] * inv;
          out[x] = static_cast<s_t>(keep * static_cast<T>(sr[x]) + alpha * (v < T(0) ? T(0) : v));
        }
      }
    } else {
      for (int64_t o = 0; o < C; ++o) {
        const T* ur = u + (b * C + o) * W;
        const int64_t base = (b * C + o) * N + row * W;
        const s_t* sr = p_s + base;
        s_t* out = p_out + base;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) out[x] = static_cast<s_t>(keep * static_cast<T>(sr[x]) + alpha * act_fn<ACT>(ur[x]));
      }
    }
  }
}

// du = α·gᵀ∂φ/∂u over [B, C, N] (triangle: r = (u > mean_c u), du = r·g' − mean_c(r·g'), g' = α·g).
template <int64_t ACT, typename T, typename g_t>
void grad_u(int64_t B, int64_t C, int64_t N, const g_t* p_g, const T* p_u, double leak, T* p_du) {
  const T alpha = static_cast<T>(leak);
  if constexpr (ACT != kTriangle) {
    at::parallel_for(0, B * C * N, 32768, [&](int64_t i0, int64_t i1) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) p_du[i] = static_cast<T>(p_g[i]) * alpha * act_grad<ACT>(p_u[i]);
    });
  } else {
    at::parallel_for(0, B * N, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t q = i0; q < i1; ++q) {
        const int64_t b = q / N, i = q % N;
        const T* u = p_u + b * C * N + i;
        const g_t* g = p_g + b * C * N + i;
        T* du = p_du + b * C * N + i;
        T mean = T(0);
        for (int64_t c = 0; c < C; ++c) mean += u[c * N];
        mean /= static_cast<T>(C);
        T rg_mean = T(0);
        for (int64_t c = 0; c < C; ++c) {
          const T rg = u[c * N] > mean ? alpha * static_cast<T>(g[c * N]) : T(0);
          du[c * N] = rg;
          rg_mean += rg;
        }
        rg_mean /= static_cast<T>(C);
        for (int64_t c = 0; c < C; ++c) du[c * N] -= rg_mean;
      }
    });
  }
}

// The competitive Hebbian step, in place on w and beta (beta in T).
template <typename T, typename s_t, typename w_t>
void hebbian_pass(const Mix& M, const s_t* p_s, w_t* p_w, const bool* p_m, T* p_beta, double eta, double tau,
                  double eta_beta, bool wins) {
  const Lattice& L = M.L;
  const int64_t W = L.W, N = L.N, Co = M.Co, Ci = M.Ci, B = M.B;
  const T inv_tau = tau > 0 ? static_cast<T>(1.0 / tau) : T(0);
  const T t_eta = static_cast<T>(eta), t_eta_beta = static_cast<T>(eta_beta);
  const T inv_co = T(1) / static_cast<T>(Co), inv_b = T(1) / static_cast<T>(B);
  at::parallel_for(0, L.D * L.H, std::max<int64_t>(1, row_grain(M) / 2), [&](int64_t r0, int64_t r1) {
    RowTerms<T> rt(L);
    std::vector<T> u(std::max<int64_t>(1, B * Co * W)), p(std::max<int64_t>(1, B * Co * W));
    std::vector<T> q(std::max<int64_t>(1, Co * W)), scale(std::max<int64_t>(1, Co * W)), psum(std::max<int64_t>(1, Co * W));
    std::vector<T> zmax(W), zsum(W);
    std::vector<T> wbuf;
    std::vector<const T*> pw;
    const int64_t R = block_rows(M);
    int64_t rb = r0, stride = 0;
    for (int64_t row = r0; row < r1; ++row) {
      if (row == r0 || row == rb + R) {
        rb = row;
        stride = pack_block<T>(M, p_w, rb, std::min(R, r1 - rb), wbuf);
      }
      const T* wp = wbuf.data() + (row - rb) * W;
      rt.terms(row, 1);
      rt.stage(p_s, B * Ci, row, p_m);
      row_sum<T>(M, rt, wp, stride, pw, u.data());
      // p = softmax_o((u + β)/τ), or the one-hot argmax (ties to the lowest o)
      const T* beta_r = p_beta + row * W;
      for (int64_t b = 0; b < B; ++b) {
        const T* ub = u.data() + b * Co * W;
        T* pb = p.data() + b * Co * W;
        if (tau > 0) {
          std::fill(zmax.begin(), zmax.end(), -std::numeric_limits<T>::infinity());
          for (int64_t o = 0; o < Co; ++o) {
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) {
              const T z = (ub[o * W + x] + beta_r[o * N + x]) * inv_tau;
              pb[o * W + x] = z;
              zmax[x] = std::max(zmax[x], z);
            }
          }
          std::fill(zsum.begin(), zsum.end(), T(0));
          for (int64_t o = 0; o < Co; ++o) {
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) {
              const T e = exp_neg(pb[o * W + x] - zmax[x]);
              pb[o * W + x] = e;
              zsum[x] += e;
            }
          }
          for (int64_t o = 0; o < Co; ++o) {
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) pb[o * W + x] /= zsum[x];
          }
        } else {
          for (int64_t x = 0; x < W; ++x) {
            int64_t best = 0;
            T vbest = ub[x] + beta_r[x];
            for (int64_t o = 1; o < Co; ++o) {
              const T v = ub[o * W + x] + beta_r[o * N + x];
              if (v > vbest) {
                vbest = v;
                best = o;
              }
            }
            for (int64_t o = 0; o < Co; ++o) pb[o * W + x] = o == best ? T(1) : T(0);
          }
        }
      }
      // q = Σ_b p·u, psum = Σ_b p, scale = η/n
      std::fill(q.begin(), q.end(), T(0));
      std::fill(psum.begin(), psum.end(), T(0));
      for (int64_t b = 0; b < B; ++b) {
        const T* ub = u.data() + b * Co * W;
        const T* pb = p.data() + b * Co * W;
#pragma omp simd
        for (int64_t j = 0; j < Co * W; ++j) {
          q[j] += pb[j] * ub[j];
          psum[j] += pb[j];
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < Co * W; ++j) scale[j] = t_eta / (wins ? T(1) + psum[j] : static_cast<T>(B));
      // W += η/n·(Σ_b p·s[nbr] − q·W) on live synapses
      const bool partial = rt.live(row, p_m);
      for (int64_t t = 0; t < rt.nt(); ++t) {
        w_t* p_wk = p_w + rt.k[t] * Co * Ci * N + row * W;
        const T* p_pk = wp + rt.k[t] * Co * Ci * stride;  // the same weights, packed with the block
        const T* vt_row = partial ? rt.valid.data() + t * W : nullptr;
        x_tiles<T>(W, [&](auto vt, int64_t x) {
          using V = decltype(vt);
          channel_groups(Co, [&](auto ot, int64_t o0) {
            constexpr int OT = decltype(ot)::value;
            partner_groups<partner_max<OT>()>(Ci, [&](auto ct, int64_t c0) {
              constexpr int CT = decltype(ct)::value;
              V a[OT][CT];
              outer_tile<OT, CT, V, T>(p.data(), W, rt.ps[t], rt.ss, B, Co, Ci, o0, c0, x, a);
              for (int o = 0; o < OT; ++o) {
                V sc = vload<V>(scale.data() + (o0 + o) * W + x);
                if (vt_row != nullptr) sc = sc * vload<V>(vt_row + x);
                const V qo = vload<V>(q.data() + (o0 + o) * W + x);
                for (int c = 0; c < CT; ++c) {
                  const int64_t q = (o0 + o) * Ci + c0 + c;
                  const V wv = vload<V>(p_pk + q * stride + x);
                  wstore<V, T>(p_wk + q * N + x, wv + sc * (a[o][c] - qo * wv));
                }
              }
            });
          });
        });
      }
      // β ← β − η_β·(mean_b p − 1/C_out)
      for (int64_t o = 0; o < Co; ++o) {
        T* br = p_beta + o * N + row * W;
        const T* ps = psum.data() + o * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) br[x] -= t_eta_beta * (ps[x] * inv_b - inv_co);
      }
    }
  });
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts);

// ---- the ops ----

at::Tensor mixing_aggregate_forward(const at::Tensor& s_in, const at::Tensor& w_in,
                                    const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
                                    c10::List<bool> periodic) {
  const at::Tensor s = s_in.contiguous(), w = w_in.contiguous();
  const Mix M = make_mix(s, w, offsets, periodic);
  at::Tensor a = empty_output({M.B, M.Co, M.L.D, M.L.H, M.L.W}, s.options());
  if (a.numel() == 0) return a;
  const bool* p_m = mask_ptr(mask);
  dispatch_state_weights<false>(s.scalar_type(), w.scalar_type(), [&](auto st, auto wt) {
    using s_t = decltype(st);
    using w_t = decltype(wt);
    using T = acc_type<s_t>;
    s_t* p_a = a.data_ptr<s_t>();
    const int64_t W = M.L.W, N = M.L.N, BCo = M.B * M.Co;
    forward_pass<T>(M, s.data_ptr<s_t>(), w.data_ptr<w_t>(), p_m, [&](int64_t row, const T* u) {
      for (int64_t q = 0; q < BCo; ++q) {
        s_t* out = p_a + q * N + row * W;
        const T* ur = u + q * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) out[x] = static_cast<s_t>(ur[x]);
      }
    });
  });
  return a;
}

std::tuple<at::Tensor, at::Tensor> mixing_aggregate_backward(const at::Tensor& g_in, const at::Tensor& s_in,
                                                              const at::Tensor& w_in,
                                                              const std::optional<at::Tensor>& mask,
                                                              const at::Tensor& offsets, c10::List<bool> periodic,
                                                              bool need_s, bool need_w) {
  const at::Tensor g = g_in.contiguous().to(s_in.scalar_type()), s = s_in.contiguous(), w = w_in.contiguous();
  const Mix M = make_mix(s, w, offsets, periodic);
  at::Tensor ds = need_s ? empty_output(s.sizes(), s.options()) : at::empty({0}, s.options());
  at::Tensor dw = need_w ? empty_output(w.sizes(), w.options()) : at::empty({0}, w.options());
  const bool* p_m = mask_ptr(mask);
  if (M.L.N == 0) return {ds, dw};
  dispatch_state_weights<false>(s.scalar_type(), w.scalar_type(), [&](auto st, auto wt) {
    using s_t = decltype(st);
    using w_t = decltype(wt);
    using T = acc_type<s_t>;
    const int64_t W = M.L.W, N = M.L.N, BCi = M.B * M.Ci;
    if (need_s && ds.numel() > 0) {
      s_t* p_ds = ds.data_ptr<s_t>();
      transposed_pass<T>(M, g.data_ptr<s_t>(), w.data_ptr<w_t>(), p_m, [&](int64_t row, const T* acc) {
        for (int64_t q = 0; q < BCi; ++q) {
          s_t* out = p_ds + q * N + row * W;
          const T* ar = acc + q * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) out[x] = static_cast<s_t>(ar[x]);
        }
      });
    }
    if (need_w && dw.numel() > 0) {
      if (M.B == 0) {
        dw.zero_();
      } else {
        weight_grad_pass<T>(M, g.data_ptr<s_t>(), s.data_ptr<s_t>(), p_m, dw.data_ptr<w_t>());
      }
    }
  });
  return {ds, dw};
}

std::tuple<at::Tensor, at::Tensor> mixing_propagate_forward(const at::Tensor& s_in, const at::Tensor& w_in,
                                                             const std::optional<at::Tensor>& mask,
                                                             const std::optional<at::Tensor>& x,
                                                             const std::optional<at::Tensor>& bias,
                                                             const at::Tensor& offsets, c10::List<bool> periodic,
                                                             double leak, int64_t act, bool save_u) {
  const at::Tensor s = s_in.contiguous(), w = w_in.contiguous();
  const Mix M = make_mix(s, w, offsets, periodic);
  TORCH_CHECK(M.Co == M.Ci, "cellkern_cpu: mixing_propagate_forward needs C_out == C_in, got ", M.Co, " and ", M.Ci);
  const at::Tensor tx = (x.has_value() && x->defined()) ? x->contiguous().to(s.scalar_type()) : at::Tensor();
  const at::Tensor tb = (bias.has_value() && bias->defined()) ? bias->contiguous().to(s.scalar_type()) : at::Tensor();
  if (tx.defined()) TORCH_CHECK(tx.sizes() == s.sizes(), "cellkern_cpu: x must be shaped like s, got ", tx.sizes());
  if (tb.defined()) {
    TORCH_CHECK(tb.dim() == 4 && tb.size(0) == M.Co && tb.numel() == M.Co * M.L.N,
                "cellkern_cpu: bias must be [C, D, H, W], got ", tb.sizes());
  }
  const auto u_opts = s.options().dtype(acc_scalar_type(s.scalar_type()));
  at::Tensor out = empty_output(s.sizes(), s.options());
  at::Tensor u = save_u ? empty_output(s.sizes(), u_opts) : at::empty({0}, u_opts);
  if (out.numel() == 0) return {out, u};
  const bool* p_m = mask_ptr(mask);
  dispatch_state_weights<false>(s.scalar_type(), w.scalar_type(), [&](auto st, auto wt) {
    using s_t = decltype(st);
    using w_t = decltype(wt);
    using T = acc_type<s_t>;
    const s_t* p_s = s.data_ptr<s_t>();
    const s_t* p_x = tx.defined() ? tx.data_ptr<s_t>() : nullptr;
    const s_t* p_b = tb.defined() ? tb.data_ptr<s_t>() : nullptr;
    s_t* p_out = out.data_ptr<s_t>();
    T* p_u = save_u ? u.data_ptr<T>() : nullptr;
    dispatch_act5(act, [&](auto a) {
      constexpr int64_t ACT = decltype(a)::value;
      forward_pass<T>(M, p_s, w.data_ptr<w_t>(), p_m, [&](int64_t row, T* ur) {
        cell_update_row<ACT, T, s_t>(M, row, ur, p_s, p_x, p_b, leak, p_out, p_u);
      });
    });
  });
  return {out, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixing_propagate_backward(
    const at::Tensor& g_in, const at::Tensor& s_in, const at::Tensor& w_in, const std::optional<at::Tensor>& mask,
    const at::Tensor& u_in, const at::Tensor& offsets, c10::List<bool> periodic, double leak, int64_t act,
    bool need_s, bool need_w) {
  const at::Tensor s = s_in.contiguous(), w = w_in.contiguous();
  const at::Tensor g = g_in.contiguous().to(s.scalar_type());
  const Mix M = make_mix(s, w, offsets, periodic);
  TORCH_CHECK(M.Co == M.Ci, "cellkern_cpu: mixing_propagate_backward needs C_out == C_in, got ", M.Co, " and ", M.Ci);
  const at::ScalarType acc = acc_scalar_type(s.scalar_type());
  const at::Tensor u = u_in.contiguous().to(acc);
  TORCH_CHECK(u.sizes() == s.sizes(), "cellkern_cpu: u must be shaped like s, got ", u.sizes());
  at::Tensor du = empty_output(s.sizes(), u.options());
  at::Tensor ds = need_s ? empty_output(s.sizes(), s.options()) : at::empty({0}, s.options());
  at::Tensor dw = need_w ? empty_output(w.sizes(), w.options()) : at::empty({0}, w.options());
  if (s.numel() == 0) {
    if (need_w) dw.zero_();
    return {ds, dw, du};
  }
  const bool* p_m = mask_ptr(mask);
  dispatch_state_weights<false>(s.scalar_type(), w.scalar_type(), [&](auto st, auto wt) {
    using s_t = decltype(st);
    using w_t = decltype(wt);
    using T = acc_type<s_t>;
    const int64_t W = M.L.W, N = M.L.N, BC = M.B * M.Ci;
    const s_t* p_g = g.data_ptr<s_t>();
    T* p_du = du.data_ptr<T>();
    dispatch_act5(act, [&](auto a) {
      grad_u<decltype(a)::value, T, s_t>(M.B, M.Co, N, p_g, u.data_ptr<T>(), leak, p_du);
    });
    if (need_s) {
      s_t* p_ds = ds.data_ptr<s_t>();
      const T keep = static_cast<T>(1.0 - leak);
      transposed_pass<T>(M, static_cast<const T*>(p_du), w.data_ptr<w_t>(), p_m, [&](int64_t row, const T* accr) {
        for (int64_t q = 0; q < BC; ++q) {
          const int64_t base = q * N + row * W;
          const s_t* gr = p_g + base;
          s_t* out = p_ds + base;
          const T* ar = accr + q * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) out[x] = static_cast<s_t>(keep * static_cast<T>(gr[x]) + ar[x]);
        }
      });
    }
    if (need_w) weight_grad_pass<T>(M, static_cast<const T*>(p_du), s.data_ptr<s_t>(), p_m, dw.data_ptr<w_t>());
  });
  return {ds, dw, du};
}

void competitive_hebbian_(at::Tensor& w, const at::Tensor& s_in, at::Tensor& beta,
                          const std::optional<at::Tensor>& mask, const at::Tensor& offsets, c10::List<bool> periodic,
                          double eta, double tau, double eta_beta, bool wins) {
  TORCH_CHECK(w.is_contiguous(), "cellkern_cpu: competitive_hebbian_: w must be contiguous");
  TORCH_CHECK(tau >= 0, "cellkern_cpu: competitive_hebbian_: tau must be >= 0, got ", tau);
  // fp64 arithmetic when w or s is fp64: then s, and a w of another dtype (an
  // fp64 copy, rounded back once), go to fp64; else s goes to fp32 unless it
  // pairs with w as the kernels take it (the same dtype, or fp16/bf16 w under fp32 s)
  const bool f64 = w.scalar_type() == at::kDouble || s_in.scalar_type() == at::kDouble;
  const at::ScalarType acc = f64 ? at::kDouble : at::kFloat;
  at::Tensor s = s_in.contiguous();
  const bool pairs = w.scalar_type() == s.scalar_type() ||
                     (s.scalar_type() == at::kFloat && (w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16));
  if (f64 || !pairs) s = s.to(acc);
  at::Tensor ww = (f64 && w.scalar_type() != at::kDouble) ? w.to(at::kDouble) : w;
  const Mix M = make_mix(s, ww, offsets, periodic);
  TORCH_CHECK(beta.numel() == M.Co * M.L.N, "cellkern_cpu: competitive_hebbian_: beta must be [C_out, D, H, W], got ",
              beta.sizes());
  if (M.B == 0 || M.L.N == 0 || w.numel() == 0) return;
  at::Tensor b = (beta.scalar_type() == acc && beta.is_contiguous()) ? beta : beta.contiguous().to(acc);
  const bool* p_m = mask_ptr(mask);
  dispatch_state_weights<false>(s.scalar_type(), ww.scalar_type(), [&](auto st, auto wt) {
    using s_t = decltype(st);
    using w_t = decltype(wt);
    using T = acc_type<s_t>;
    hebbian_pass<T>(M, s.data_ptr<s_t>(), ww.data_ptr<w_t>(), p_m, b.data_ptr<T>(), eta, tau, eta_beta, wins);
  });
  if (!ww.is_same(w)) w.copy_(ww);
  if (!b.is_same(beta)) beta.copy_(b);
}

}  // namespace cpu
}  // namespace cellkern
