// Fused CPU kernels of the plasticity family (SPEC §3–§4), in place, no autograd.
//
//   lateral_inhibition  y'[b,i] = relu(y[b,i] − β·mean_k y[b,nbr(i,k)])
//   local_winners       win[b,i] = y[b,i] > θ_act and y[b,i] ≥ max_k y[b,nbr(i,k)]
//   plasticity_         the fused step: (inhibition) → winners → spikes →
//                       STDP + BCM terms → gate → batch mean → normalise →
//                       clamp, one read and one write of w; then traces, θ
//   heterosynaptic_normalize_   Σ_k |w[k,i]| of each cell scaled to a target
//
// Every pass is parallel over lattice rows (z, y); a thread owns whole rows
// of w, so nothing needs atomics. Per row, the fields of the neighbour rows
// (z+dz, y+dy) are loaded once into rows padded by reach_x cells at each end
// (wrapped values along a periodic x, zeros along a zero x), so that every
// offset reads its neighbour at pad[R + x + dx] without a test and the x loops
// vectorise. The update of a synapse is affine in w (csrc/plasticity.h):
// the per-sample sums go into two K×W row buffers (c0, c1), then w is read,
// updated, normalised and clamped in one sweep over the row's K·W synapses.
//
// Precision: per-cell fields and all sums are fp32 (fp64 when w or the state
// is fp64); w is loaded in its own dtype and rounded back to it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "../plasticity.h"
#include "../stencil.h"
#include "lattice.h"

namespace cellkern {
namespace cpu {
namespace {

// The neighbour rows of the lattice row (z, y): the distinct existing rows
// (z+dz, y+dy) and, per offset, which of them it reads (-1: the row lies
// outside a zero boundary, so every synapse of that offset is dead).
struct RowNeighbours {
  std::vector<int64_t> rows, slot;
  void build(const Lattice& L, int64_t z, int64_t y) {
    rows.clear();
    slot.assign(L.K, -1);
    for (int64_t k = 0; k < L.K; ++k) {
      const int64_t nr = nbr_row(z, y, L.dz[k], L.dy[k], L.D, L.H, L.pz, L.py);
      if (nr < 0) continue;
      const auto it = std::find(rows.begin(), rows.end(), nr);
      slot[k] = it - rows.begin();
      if (it == rows.end()) rows.push_back(nr);
    }
  }
};

// dst[R + x] = f(src[x]) for x in [0, W); the R cells on each side hold the
// wrapped values (periodic) or 0 (zero boundary: a neighbour outside reads 0).
template <typename A, typename F>
inline void load_padded(const A* src, A* dst, int64_t W, int64_t R, bool periodic, F f) {
#pragma omp simd
  for (int64_t x = 0; x < W; ++x) dst[R + x] = f(src[x]);
  for (int64_t e = 1; e <= R; ++e) {
    dst[R - e] = periodic ? f(src[wrap(-e, W)]) : A(0);
    dst[R + W - 1 + e] = periodic ? f(src[wrap(W - 1 + e, W)]) : A(0);
  }
}

template <typename A>
struct Identity {
  A operator()(A v) const { return v; }
};

// Per row: padded rows of one field per neighbour slot, and the row each
// offset reads (a zero row where its neighbour row does not exist).
template <typename A>
struct PaddedRows {
  int64_t W, R, P;
  std::vector<A> buf, zero;
  PaddedRows(const Lattice& L) : W(L.W), R(L.reach_x), P(L.W + 2 * L.reach_x), buf(L.K * P), zero(P, A(0)) {}
  template <typename F>
  void load(const Lattice& L, const RowNeighbours& nb, const A* field, F f) {
    for (size_t s = 0; s < nb.rows.size(); ++s) load_padded(field + nb.rows[s] * W, buf.data() + s * P, W, R, L.px, f);
  }
  // the neighbour of cell x at offset k is at(k)[x]
  const A* at(const RowNeighbours& nb, const Lattice& L, int64_t k) const {
    const A* base = nb.slot[k] < 0 ? zero.data() : buf.data() + nb.slot[k] * P;
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

// out[b,i] = relu(y[b,i] − β·Σ_k y[b,nbr] / K)  (mode 0)  or
// out[b,i] = y[b,i] > θ and y[b,i] ≥ max_k y[b,nbr] (mode 1)
template <int MODE, typename A, typename O>
void neighbourhood_pass(const Lattice& L, int64_t B, const A* y, A param, O* out) {
  const int64_t W = L.W, N = L.N, K = L.K;
  at::parallel_for(0, L.D * L.H, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, K * W * B)),
                   [&](int64_t r0, int64_t r1) {
    RowNeighbours nb;
    PaddedRows<A> pad(L);
    std::vector<A> red(W);
    for (int64_t row = r0; row < r1; ++row) {
      nb.build(L, row / L.H, row % L.H);
      for (int64_t b = 0; b < B; ++b) {
        const A* p_y = y + b * N;
        pad.load(L, nb, p_y, Identity<A>());
        std::fill(red.begin(), red.end(), MODE == 0 ? A(0) : -INFINITY);
        for (int64_t k = 0; k < K; ++k) {
          const A* p_n = pad.at(nb, L, k);
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) red[x] = MODE == 0 ? red[x] + p_n[x] : std::max(red[x], p_n[x]);
        }
        const A* p_yr = p_y + row * W;
        O* p_o = out + b * N + row * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) {
          if constexpr (MODE == 0) {
            p_o[x] = static_cast<O>(inhibit(p_yr[x], red[x], param, K));
          } else {
            p_o[x] = wins(p_yr[x], red[x], param);
          }
        }
      }
    }
  });
}

// The per-cell inputs of the fused step, all in the accumulation type A.
template <typename A>
struct CellFields {
  int64_t B;
  const A *y, *spikes, *x_pre, *x_post, *theta, *gate, *lr;
};

// One offset's synapses of one row, x in [lo, hi): the terms of the current
// sample (cell coefficients p, q, r; neighbour fields xn, zn, yn), plus the
// earlier samples' sums (acc0, acc1) when HAS_ACC, give Δw = c0 + c1·w.
//   SWEEP == 0: accumulate c0, c1 into acc0, acc1 (FIRST: overwrite)
//   SWEEP == 1: w ← clamp(w + Δw) on live synapses
//   SWEEP == 2: nw ← w + Δw on live synapses, Σ|w| before/after into sb, sa
template <int SWEEP, bool HAS_ACC, bool FIRST, typename w_t, typename A>
inline void synapse_row(int64_t lo, int64_t hi, const WeightDependence<A> wd, const A* __restrict p,
                        const A* __restrict q, const A* __restrict r, const A* __restrict d, const A* __restrict xn,
                        const A* __restrict zn, const A* __restrict yn, A* __restrict acc0, A* __restrict acc1,
                        w_t* __restrict w, const uint8_t* __restrict live, A w_lo, A w_hi, A* __restrict nw,
                        A* __restrict sb, A* __restrict sa) {
#pragma omp simd
  for (int64_t x = lo; x < hi; ++x) {
    A c0 = A(0), c1 = A(0);
    if constexpr (HAS_ACC) {
      c0 = acc0[x];
      c1 = acc1[x];
    }
    synapse_terms(wd, p[x], q[x], r[x], xn[x], zn[x], yn[x], &c0, &c1);
    if constexpr (SWEEP == 0) {
      acc0[x] = c0;
      acc1[x] = c1;
    } else {
      const A wo = static_cast<A>(w[x]);
      const A wn = wo + c0 + (c1 - d[x]) * wo;
      if constexpr (SWEEP == 1) {
        w[x] = live[x] ? static_cast<w_t>(clamp_weight(wn, w_lo, w_hi)) : w[x];
      } else {
        const A lv = A(live[x]);
        nw[x] = live[x] ? wn : wo;
        sb[x] += lv * std::abs(wo);
        sa[x] += lv * std::abs(wn);
      }
    }
  }
}

// The fused step's w sweep (see the file comment). Per row and sample: the
// neighbour fields and the post cells' coefficients; the samples before the
// last sum their terms into (c0, c1), the last one's terms go straight into
// the read-update-write of w. The x loops are branch-free (absent inputs read
// rows of 0 or 1, rules that are off have rates 0) so that they vectorise.
template <typename w_t, typename A>
void plasticity_pass(const Lattice& L, const PlasticityParams P, w_t* w, const bool* m, const CellFields<A> F) {
  const int64_t W = L.W, N = L.N, K = L.K, B = F.B;
  const A invB = A(1) / A(B), thr = A(P.threshold), e_pre = A(P.decay_pre);
  const A w_lo = A(P.w_min), w_hi = A(P.w_max);
  const Rates<A> rt = rates<A>(P);
  const WeightDependence<A> wd = weight_dependence<A>(P.multiplicative, w_lo, w_hi);
  const bool need_y = P.bcm || P.competition || F.spikes == nullptr;
  at::parallel_for(0, L.D * L.H, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, K * W * B)),
                   [&](int64_t r0, int64_t r1) {
    RowNeighbours nb;
    PaddedRows<A> ypad(L), xpad(L), zpad(L);
    std::vector<A> c0(B > 1 ? K * W : 0), c1(B > 1 ? K * W : 0), nw(K * W), cp(W), cq(W), cr(W), nmax(W), g(W),
        zc(W), dcell(W), upd(W), before(W), after(W), zeros(W, A(0)), ones(W, A(1));
    std::vector<uint8_t> all_live(W, 1);
    for (int64_t row = r0; row < r1; ++row) {
      nb.build(L, row / L.H, row % L.H);
      std::fill(dcell.begin(), dcell.end(), A(0));
      std::fill(upd.begin(), upd.end(), A(0));
      std::fill(before.begin(), before.end(), A(0));
      std::fill(after.begin(), after.end(), A(0));
      const int64_t base = row * W;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t bb = b * N;
        if (need_y) ypad.load(L, nb, F.y + bb, Identity<A>());
        if (P.stdp) {
          xpad.load(L, nb, F.x_pre + bb, [e_pre](A v) { return v * e_pre; });
          if (F.spikes != nullptr) {
            zpad.load(L, nb, F.spikes + bb, Identity<A>());
          } else {
            zpad.load(L, nb, F.y + bb, [thr](A v) { return v > thr ? A(1) : A(0); });
          }
        }
        // the post cells' coefficients for this sample
        const A* p_yc = need_y ? F.y + bb + base : zeros.data();
        if (P.competition) {
          std::fill(nmax.begin(), nmax.end(), A(-INFINITY));
          for (int64_t k = 0; k < K; ++k) {
            const A* __restrict p_n = ypad.at(nb, L, k);
            A* __restrict p_mx = nmax.data();
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) p_mx[x] = p_n[x] > p_mx[x] ? p_n[x] : p_mx[x];
          }
          for (int64_t x = 0; x < W; ++x) g[x] = wins(p_yc[x], nmax[x], thr) ? A(1) : A(0);
        } else {
          std::fill(g.begin(), g.end(), A(1));
        }
        if (F.spikes != nullptr) {
          std::copy(F.spikes + bb + base, F.spikes + bb + base + W, zc.begin());
        } else {
          for (int64_t x = 0; x < W; ++x) zc[x] = p_yc[x] > thr ? A(1) : A(0);
        }
        {
          const A* __restrict p_g = F.gate != nullptr ? F.gate + bb + base : ones.data();
          const A* __restrict p_lr = F.lr != nullptr ? F.lr + base : ones.data();
          const A* __restrict p_xq = P.stdp ? F.x_post + bb + base : zeros.data();
          const A* __restrict p_th = P.bcm ? F.theta + base : zeros.data();
          const A* __restrict p_z = zc.data();
          const A* __restrict p_y = p_yc;
          const A* __restrict p_gg = g.data();
          A* __restrict p_cp = cp.data();
          A* __restrict p_cq = cq.data();
          A* __restrict p_cr = cr.data();
          A* __restrict p_dc = dcell.data();
          A* __restrict p_up = upd.data();
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) {
            const A gx = p_gg[x] * p_g[x];
            const CellTerms<A> ct = cell_terms(rt, gx * invB * p_lr[x], p_z[x], p_xq[x], p_y[x], p_th[x]);
            p_cp[x] = ct.p;
            p_cq[x] = ct.q;
            p_cr[x] = ct.r;
            p_dc[x] += ct.d;
            p_up[x] = gx > p_up[x] ? gx : p_up[x];
          }
        }
        const bool last = b == B - 1;
        for (int64_t k = 0; k < K; ++k) {
          if (nb.slot[k] < 0) continue;
          int64_t lo = 0, hi = W;
          if (last) live_range(L, k, &lo, &hi);
          const A* xn = xpad.at(nb, L, k);
          const A* zn = zpad.at(nb, L, k);
          const A* yn = ypad.at(nb, L, k);
          A* a0 = B > 1 ? c0.data() + k * W : nullptr;
          A* a1 = B > 1 ? c1.data() + k * W : nullptr;
          w_t* p_w = w + k * N + base;
          const uint8_t* p_m = m != nullptr ? reinterpret_cast<const uint8_t*>(m) + k * N + base : all_live.data();
          A* p_n = nw.data() + k * W;
#define CK_SYNAPSE_ROW(SWEEP, HAS_ACC, FIRST)                                                                    \
  synapse_row<SWEEP, HAS_ACC, FIRST>(lo, hi, wd, cp.data(), cq.data(), cr.data(), dcell.data(), xn, zn, yn, a0, a1, \
                                     p_w, p_m, w_lo, w_hi, p_n, before.data(), after.data())
          if (!last) {
            if (b == 0) {
              CK_SYNAPSE_ROW(0, false, true);
            } else {
              CK_SYNAPSE_ROW(0, true, false);
            }
          } else if (B == 1) {
            if (P.normalize) {
              CK_SYNAPSE_ROW(2, false, false);
            } else {
              CK_SYNAPSE_ROW(1, false, false);
            }
          } else if (P.normalize) {
            CK_SYNAPSE_ROW(2, true, false);
          } else {
            CK_SYNAPSE_ROW(1, true, false);
          }
#undef CK_SYNAPSE_ROW
        }
      }
      if (!P.normalize) continue;
      // Σ|w| back to its value before, on the cells that learnt; then clamp
      for (int64_t x = 0; x < W; ++x) before[x] = normalize_scale(before[x], after[x], upd[x] > A(0));
      for (int64_t k = 0; k < K; ++k) {
        if (nb.slot[k] < 0) continue;
        int64_t lo, hi;
        live_range(L, k, &lo, &hi);
        w_t* __restrict p_w = w + k * N + base;
        const uint8_t* __restrict p_m =
            m != nullptr ? reinterpret_cast<const uint8_t*>(m) + k * N + base : all_live.data();
        const A* __restrict p_n = nw.data() + k * W;
        const A* __restrict p_s = before.data();
#pragma omp simd
        for (int64_t x = lo; x < hi; ++x) {
          const A wn = clamp_weight(p_n[x] * p_s[x], w_lo, w_hi);
          p_w[x] = p_m[x] ? static_cast<w_t>(wn) : p_w[x];
        }
      }
    }
  });
}

// After the sweep: traces decay and take the spikes; θ follows mean_b y².
template <typename A>
void state_pass(const Lattice& L, const PlasticityParams P, const CellFields<A> F, A* x_pre, A* x_post, A* theta) {
  const int64_t N = L.N, B = F.B;
  const A thr = A(P.threshold), e_pre = A(P.decay_pre), e_post = A(P.decay_post), invB = A(1) / A(B);
  at::parallel_for(0, N, 16384, [&](int64_t i0, int64_t i1) {
    if (P.bcm) {
      for (int64_t i = i0; i < i1; ++i) {
        A m2 = 0;
        for (int64_t b = 0; b < B; ++b) m2 += F.y[b * N + i] * F.y[b * N + i];
        theta[i] = theta_update(P, theta[i], m2 * invB);
      }
    }
    if (P.stdp) {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t bb = b * N;
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) {
          const A z = F.spikes != nullptr ? F.spikes[bb + i] : (F.y[bb + i] > thr ? A(1) : A(0));
          x_pre[bb + i] = x_pre[bb + i] * e_pre + z;
          x_post[bb + i] = x_post[bb + i] * e_post + z;
        }
      }
    }
  });
}

template <typename w_t, typename A>
void normalize_pass(const Lattice& L, w_t* w, const bool* m, const A* target, const bool* where) {
  const int64_t W = L.W, N = L.N, K = L.K;
  at::parallel_for(0, L.D * L.H, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, K * W)),
                   [&](int64_t r0, int64_t r1) {
    RowNeighbours nb;
    std::vector<A> total(W);
    for (int64_t row = r0; row < r1; ++row) {
      nb.build(L, row / L.H, row % L.H);
      const int64_t base = row * W;
      std::fill(total.begin(), total.end(), A(0));
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t k = 0; k < K; ++k) {
          if (nb.slot[k] < 0) continue;
          int64_t lo, hi;
          live_range(L, k, &lo, &hi);
          w_t* p_w = w + k * N + base;
          const bool* p_m = m != nullptr ? m + k * N + base : nullptr;
          A* p_t = total.data();
#pragma omp simd
          for (int64_t x = lo; x < hi; ++x) {
            const bool live = p_m == nullptr || p_m[x];
            if (pass == 0) {
              p_t[x] += live ? std::abs(static_cast<A>(p_w[x])) : A(0);
            } else if (live) {
              p_w[x] = static_cast<w_t>(static_cast<A>(p_w[x]) * p_t[x]);
            }
          }
        }
        if (pass == 0) {
          for (int64_t x = 0; x < W; ++x) {
            const bool ok = where == nullptr || where[base + x];
            total[x] = normalize_scale(target[base + x], total[x], ok);
          }
        }
      }
    }
  });
}

template <typename T>
const T* opt_data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_data(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

at::Tensor opt_tensor(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? *t : at::Tensor();
}

// The tensor in the accumulation type (itself when it already is).
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  return (!t.defined() || t.scalar_type() == acc) ? t : t.to(acc);
}

}  // namespace

at::Tensor lateral_inhibition(const at::Tensor& y, double beta, const at::Tensor& offsets, c10::List<bool> periodic) {
  TORCH_CHECK(y.dim() == 4, "cellkern_cpu: y must be [B, D, H, W], got ", y.sizes());
  const Lattice L = make_lattice(1, 1, y.size(1), y.size(2), y.size(3), offsets, periodic);
  const at::ScalarType acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor ya = as_acc(y, acc);
  at::Tensor out = empty_output(y.sizes(), y.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "lateral_inhibition", [&] {
    neighbourhood_pass<0>(L, y.size(0), ya.data_ptr<scalar_t>(), scalar_t(beta), out.data_ptr<scalar_t>());
  });
  return out.scalar_type() == y.scalar_type() ? out : out.to(y.scalar_type());
}

at::Tensor local_winners(const at::Tensor& y, double threshold, const at::Tensor& offsets, c10::List<bool> periodic) {
  TORCH_CHECK(y.dim() == 4, "cellkern_cpu: y must be [B, D, H, W], got ", y.sizes());
  const Lattice L = make_lattice(1, 1, y.size(1), y.size(2), y.size(3), offsets, periodic);
  const at::ScalarType acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor ya = as_acc(y, acc);
  at::Tensor out = empty_output(y.sizes(), y.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(acc, "local_winners", [&] {
    neighbourhood_pass<1>(L, y.size(0), ya.data_ptr<scalar_t>(), scalar_t(threshold), out.data_ptr<bool>());
  });
  return out;
}

void plasticity_(at::Tensor& w, const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
                 c10::List<bool> periodic, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& spikes,
                 const std::optional<at::Tensor>& x_pre, const std::optional<at::Tensor>& x_post,
                 const std::optional<at::Tensor>& theta, const std::optional<at::Tensor>& gate,
                 const std::optional<at::Tensor>& lr, c10::List<bool> flags, at::ArrayRef<double> scalars) {
  TORCH_CHECK(w.dim() == 4 && w.is_contiguous(), "cellkern_cpu: w must be a contiguous [K, D, H, W] tensor");
  TORCH_CHECK(flags.size() == 5 && scalars.size() == 13, "cellkern_cpu: plasticity_ takes 5 flags and 13 scalars");
  PlasticityParams P;
  P.stdp = flags.get(0);
  P.multiplicative = flags.get(1);
  P.bcm = flags.get(2);
  P.competition = flags.get(3);
  P.normalize = flags.get(4);
  P.a_plus = scalars[0];
  P.a_minus = scalars[1];
  P.decay_pre = scalars[2];
  P.decay_post = scalars[3];
  P.bcm_lr = scalars[4];
  P.bcm_decay = scalars[5];
  P.tau_theta = scalars[6];
  P.theta_min = scalars[7];
  P.theta_max = scalars[8];
  P.beta = scalars[9];
  P.threshold = scalars[10];
  P.w_min = scalars[11];
  P.w_max = scalars[12];

  const at::Tensor t_y = opt_tensor(y), t_sp = opt_tensor(spikes), t_xp = opt_tensor(x_pre),
                   t_xq = opt_tensor(x_post), t_th = opt_tensor(theta), t_g = opt_tensor(gate), t_lr = opt_tensor(lr);
  const at::Tensor& per_sample = t_y.defined() ? t_y : t_sp;
  TORCH_CHECK(per_sample.defined(), "cellkern_cpu: plasticity_ needs y or spikes");
  TORCH_CHECK(t_y.defined() || !(P.bcm || P.competition), "cellkern_cpu: BCM and competition need y");
  TORCH_CHECK(!P.stdp || (t_xp.defined() && t_xq.defined()), "cellkern_cpu: STDP needs both traces");
  TORCH_CHECK(!P.bcm || t_th.defined(), "cellkern_cpu: BCM needs theta");
  const int64_t B = per_sample.size(0);
  const Lattice L = make_lattice(1, 1, w.size(1), w.size(2), w.size(3), offsets, periodic);
  TORCH_CHECK(offsets.size(0) == w.size(0), "cellkern_cpu: w has ", w.size(0), " offsets, the stencil ",
              offsets.size(0));

  const at::ScalarType state = per_sample.scalar_type();
  const at::ScalarType acc =
      (w.scalar_type() == at::kDouble || state == at::kDouble) ? at::kDouble : at::kFloat;
  at::Tensor ya = as_acc(t_y, acc);
  if (P.competition) {
    at::Tensor yp = at::empty(ya.sizes(), ya.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "lateral_inhibition", [&] {
      neighbourhood_pass<0>(L, B, ya.data_ptr<scalar_t>(), scalar_t(P.beta), yp.data_ptr<scalar_t>());
    });
    ya = yp;
  }
  at::Tensor xpa = as_acc(t_xp, acc), xqa = as_acc(t_xq, acc), tha = as_acc(t_th, acc);
  const at::Tensor spa = as_acc(t_sp, acc), ga = as_acc(t_g, acc), lra = as_acc(t_lr, acc);
  const bool* p_m = (mask.has_value() && mask->defined()) ? mask->data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(acc, "plasticity_", [&] {
    using A = scalar_t;
    const CellFields<A> F{B, opt_data<A>(ya), opt_data<A>(spa), opt_data<A>(xpa), opt_data<A>(xqa),
                          opt_data<A>(tha), opt_data<A>(ga), opt_data<A>(lra)};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "plasticity_", [&] {
      plasticity_pass<scalar_t, A>(L, P, w.data_ptr<scalar_t>(), p_m, F);
    });
    state_pass<A>(L, P, F, mut_data<A>(xpa), mut_data<A>(xqa), mut_data<A>(tha));
  });
  // traces and θ held in another dtype were updated in a copy
  if (P.stdp && !xpa.is_same(t_xp)) {
    t_xp.copy_(xpa);
    t_xq.copy_(xqa);
  }
  if (P.bcm && !tha.is_same(t_th)) t_th.copy_(tha);
}

void heterosynaptic_normalize_(at::Tensor& w, const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
                               c10::List<bool> periodic, const at::Tensor& target,
                               const std::optional<at::Tensor>& where) {
  TORCH_CHECK(w.dim() == 4 && w.is_contiguous(), "cellkern_cpu: w must be a contiguous [K, D, H, W] tensor");
  const Lattice L = make_lattice(1, 1, w.size(1), w.size(2), w.size(3), offsets, periodic);
  const at::ScalarType acc = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor ta = as_acc(target, acc);
  const bool* p_m = (mask.has_value() && mask->defined()) ? mask->data_ptr<bool>() : nullptr;
  const bool* p_where = (where.has_value() && where->defined()) ? where->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "heterosynaptic_normalize_", [&] {
    if (acc == at::kDouble) {
      normalize_pass<scalar_t, double>(L, w.data_ptr<scalar_t>(), p_m, ta.data_ptr<double>(), p_where);
    } else {
      normalize_pass<scalar_t, float>(L, w.data_ptr<scalar_t>(), p_m, ta.data_ptr<float>(), p_where);
    }
  });
}

}  // namespace cpu
}  // namespace cellkern
