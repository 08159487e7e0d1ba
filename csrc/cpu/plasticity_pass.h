// The fused plasticity step's sweep over w (the definition behind the
// plasticity_pass declaration in plasticity_rows.h). Included only by the
// plasticity_*.cpp files, each of which instantiates it for some (w_t, A)
// pairs: the instantiations compile in parallel instead of one after another.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

// as in plasticity.cpp: GCC 12's SLP vectoriser adds nothing to these
// kernels and crashes on the fp16 instantiations
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-slp-vectorize")
#endif

#include "../plasticity.h"
#include "../stencil.h"
#include "lattice.h"
#include "plasticity_rows.h"

namespace cellkern {
namespace cpu {

// The fused step's w sweep (see the file comment). Per row and sample: the
// neighbour fields and the post cells' coefficients; the samples before the
// last sum their terms into (c0, c1), the last one's terms go straight into
// the one read-update-write of w (sweep_row: cells outer, offsets inner, so
// a cell's Σ|w| and scale stay in registers).

// Into L2, the per-cell fields a later row will read from memory: its own
// post traces, θ and activity, and the new neighbour rows of y and x_pre
// (~13% of the fused step at 128³, B = 1, one thread).
template <typename A>
void prefetch_fields(const Lattice& L, const PlasticityParams& P, const CellFields<A>& F, int64_t row,
                     RowNeighbours* nb, bool need_y) {
  const int64_t W = L.W, base = row * W;
  nb->build(L, row / L.H, row % L.H);
  for (int64_t b = 0; b < F.B; ++b) {
    if (need_y) prefetch_row(F.y + b * L.N + base, W);
    if (P.stdp) prefetch_row(F.x_post + b * L.N + base, W);
  }
  if (need_y) prefetch_new_rows(L, *nb, F.y, F.B);
  if (P.stdp) prefetch_new_rows(L, *nb, F.x_pre, F.B);
  if (P.bcm) prefetch_row(F.theta + base, W);
}

template <typename w_t, typename A>
void plasticity_rows(const Lattice& L, const PlasticityParams& P, w_t* w, const bool* m, const CellFields<A>& F,
                     int64_t r0, int64_t r1) {
  const int64_t W = L.W, N = L.N, K = L.K, B = F.B;
  const A invB = A(1) / A(B), thr = A(P.threshold), e_pre = A(P.decay_pre);
  const A w_lo = A(P.w_min), w_hi = A(P.w_max);
  const Rates<A> rt = rates<A>(P);
  const bool need_y = P.bcm || P.competition || F.spikes == nullptr;
  // the flags of the sweep: one compiled sweep_row per combination, picked
  // once per row (the per-row work outside the sweep is compiled once)
  const bool MULT = P.multiplicative, NORM = P.normalize, ACC = B > 1;
  const bool LIVE = m != nullptr || !L.px;  // some synapses of a row may be dead
  // the x range whose synapses all live in every row: the whole row along a
  // periodic x without a mask; inside the zero x boundary's reach without a
  // mask (the sweep runs its edges alone); none with a mask
  int64_t live_lo = 0, live_hi = W;
  if (m != nullptr) {
    live_lo = live_hi = 0;
  } else if (!L.px) {
    live_lo = std::min(W, L.reach_x);
    live_hi = std::max(live_lo, W - L.reach_x);
  }
  constexpr int64_t kLanes = sizeof(typename Simd<A>::type) / sizeof(A);
  {
    {
      RowNeighbours nb(L);
      PaddedRows<A> ypad(L), xpad(L), zpad(L);
      std::vector<A> c0(ACC ? K * W : 0), c1(ACC ? K * W : 0), live(LIVE ? K * W : 0), scratch(K * kLanes), cp(W),
          cq(W), cr(W), nmax(W), g(W), zc(W), dcell(W), upd(W), zeros(W, A(0)), ones(W, A(1));
      std::vector<w_t*> w_rows(K);
      std::vector<const A*> xn(K), zn(K), yn(K), lv(K), a0(K), a1(K);
      for (int64_t k = 0; k < K; ++k) {
        lv[k] = LIVE ? live.data() + k * W : nullptr;
        a0[k] = ACC ? c0.data() + k * W : nullptr;
        a1[k] = ACC ? c1.data() + k * W : nullptr;
        if (LIVE && m == nullptr) {  // zero x boundary: the same dead cells in every row
          int64_t lo, hi;
          live_range(L, k, &lo, &hi);
          for (int64_t x = 0; x < W; ++x) live[k * W + x] = (x >= lo && x < hi) ? A(1) : A(0);
        }
      }
      RowNeighbours nb_ahead(L);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t zr = row / L.H, yr = row % L.H;
        if (row + kPrefetchRows < r1) prefetch_fields(L, P, F, row + kPrefetchRows, &nb_ahead, need_y);
        nb.build(L, zr, yr);
        std::fill(dcell.begin(), dcell.end(), A(0));
        std::fill(upd.begin(), upd.end(), A(0));
        const int64_t base = row * W;
        for (int64_t b = 0; b < B; ++b) {
          const int64_t bb = b * N;
          if (need_y) ypad.load(L, nb, zr, yr, b, F.y + bb, Identity<A>());
          if (P.stdp) {
            xpad.load(L, nb, zr, yr, b, F.x_pre + bb, [e_pre](A v) { return v * e_pre; });
            if (F.spikes != nullptr) {
              zpad.load(L, nb, zr, yr, b, F.spikes + bb, Identity<A>());
            } else {
              zpad.load(L, nb, zr, yr, b, F.y + bb, [thr](A v) { return v > thr ? A(1) : A(0); });
            }
          }
          // the post cells' coefficients for this sample
          const A* p_yc = need_y ? F.y + bb + base : zeros.data();
          ypad.pointers(nb, L, yn.data());
          xpad.pointers(nb, L, xn.data());
          zpad.pointers(nb, L, zn.data());
          if (P.competition) {
            reduce_rows<true>(yn.data(), K, W, nmax.data());
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
          if (b < B - 1) {
            for (int64_t k = 0; k < K; ++k) {
              if (nb.slot[k] < 0) continue;
              accumulate_row_any(MULT, b == 0, W, w_lo, w_hi, cp.data(), cq.data(), cr.data(), xn[k], zn[k], yn[k],
                                 c0.data() + k * W, c1.data() + k * W);
            }
            continue;
          }
          for (int64_t k = 0; k < K; ++k) {
            w_rows[k] = nb.slot[k] < 0 ? nullptr : w + k * N + base;
            if (LIVE && m != nullptr && w_rows[k] != nullptr) {
              const int64_t dx = L.dx[k];
              const uint8_t* p_m = reinterpret_cast<const uint8_t*>(m + k * N + base);
              A* p_l = live.data() + k * W;
              const bool px = L.px;
              // branch-free: a random mask made the short-circuit version mispredict
              // about every other synapse (4x slower step at 128³ with 70% live)
#pragma omp simd
              for (int64_t x = 0; x < W; ++x) {
                const bool ok = px | ((x + dx >= 0) & (x + dx < W));
                p_l[x] = A(p_m[x] & uint8_t(ok));
              }
            }
          }
          const SweepRow<A, w_t> S{W, K, w_rows.data(), xn.data(), zn.data(), yn.data(), lv.data(), a0.data(),
                                   a1.data(), cp.data(), cq.data(), cr.data(), dcell.data(), upd.data(), w_lo, w_hi,
                                   scratch.data(), kPrefetchRows * W};
          sweep_row_any(MULT, NORM, LIVE, ACC, S, live_lo, live_hi);
        }
        row_state(P, F, base, W, N);
      }
    }
  }
}

// After a row's sweep, the state that only the row itself reads: θ follows
// mean_b y², the post traces decay and take the spikes (the pre traces are
// read by the neighbouring rows too: state_pass updates them after the sweep).
template <typename A>
void row_state(const PlasticityParams& P, const CellFields<A>& F, int64_t base, int64_t W, int64_t N) {
  const int64_t B = F.B;
  const A thr = A(P.threshold), e_post = A(P.decay_post), invB = A(1) / A(B);
  if (P.bcm) {
    A* __restrict p_th = F.theta + base;
    for (int64_t x0 = 0; x0 < W; x0 += 256) {
      A m2[256];
      const int64_t n = std::min<int64_t>(256, W - x0);
      std::fill(m2, m2 + n, A(0));
      for (int64_t b = 0; b < B; ++b) {
        const A* __restrict p_y = F.y + b * N + base + x0;
#pragma omp simd
        for (int64_t x = 0; x < n; ++x) m2[x] += p_y[x] * p_y[x];
      }
#pragma omp simd
      for (int64_t x = 0; x < n; ++x) p_th[x0 + x] = theta_update(P, p_th[x0 + x], m2[x] * invB);
    }
  }
  if (P.stdp) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t o = b * N + base;
      A* __restrict p_xq = F.x_post + o;
      if (F.spikes != nullptr) {
        const A* __restrict p_z = F.spikes + o;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) p_xq[x] = p_xq[x] * e_post + p_z[x];
      } else {
        const A* __restrict p_y = F.y + o;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) p_xq[x] = p_xq[x] * e_post + (p_y[x] > thr ? A(1) : A(0));
      }
    }
  }
}

template <typename w_t, typename A>
void plasticity_pass(const Lattice& L, const PlasticityParams P, w_t* w, const bool* m, const CellFields<A> F) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, L.K * L.W * F.B));
  at::parallel_for(0, L.D * L.H, grain,
                   [&](int64_t r0, int64_t r1) { plasticity_rows<w_t, A>(L, P, w, m, F, r0, r1); });
}

}  // namespace cpu
}  // namespace cellkern

/// The explicit instantiation of plasticity_pass<w_t, A>, inside namespace cellkern::cpu.
#define CELLKERN_PLASTICITY_PASS(w_t, A) \
  template void plasticity_pass<w_t, A>(const Lattice&, const PlasticityParams, w_t*, const bool*, const CellFields<A>)
