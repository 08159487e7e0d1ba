// CUDA kernels of the plasticity family (SPEC §3–§4), in place, no autograd.
//
//   neighbourhood        y'[b,i] = relu(y[b,i] − β·mean_k y[b,nbr(i,k)])        (inhibit)
//                        win[b,i] = y[b,i] > θ_act and y[b,i] ≥ max_k y[b,nbr]  (winners)
//                        g[b,i] = win[b,i]·gate[b,i]                           (gate)
//   plasticity_synapses  the fused step's one read and one write of w: per
//                        live synapse Δw = c0 + c1·w from the per-sample
//                        STDP + BCM terms gated by g (csrc/plasticity.h), w + Δw,
//                        Σ_k|w| of the cell back to its value before, clamp
//   plasticity_cells     traces (decay, + z) and θ, after every synapse has
//                        read the old traces of its neighbours
//   normalize            Σ_k |w[k,i]| of each cell scaled to a target
//
// The fused step on a GPU: (1) with competition, y' = inhibit(y) and the gate
// g = win(y')·gate go to two small per-cell scratches (winners need y' of the
// neighbours, whose inhibition needs *their* neighbours); (2) the synapse
// pass: a thread owns a cell and its K synapses, holds them in registers
// (K ≤ 32) while it loops over the batch, so w is read once and written once,
// coalesced along x; (3) the cell pass. Everything per synapse (the affine
// Δw, the bounds, the normalisation scale) is the arithmetic of
// csrc/plasticity.h, shared with the CPU kernels.
//
// Precision: per-cell fields and all sums in A (fp32, or fp64 when w or the
// state is fp64); w loaded in its dtype and rounded back once.
#include "common.cuh"

namespace cellkern {
namespace cuda {
namespace {

template <typename A>
__global__ void __launch_bounds__(kThreads)
    neighbourhood_kernel(const Lattice L, const A* __restrict__ p_y, const A param, const int mode,
                         const A* __restrict__ p_gate, void* __restrict__ p_out) {
  int4* s_off = shared_offsets();
  load_offsets(L, 1, s_off);
  const Cell c = this_cell(L);
  if (!c.in) return;
  const int64_t N = int64_t(L.D) * L.H * L.W;
  for (int64_t b = 0; b < L.BC; ++b) {
    const A* p_yb = p_y + b * N;
    A sum = A(0), top = A(0);
    for (int k = 0; k < L.K; ++k) {
      const int j = nbr_of(L, c, s_off[k]);
      const A v = j >= 0 ? p_yb[j] : A(0);  // outside a zero boundary: 0
      sum += v;
      top = (k == 0 || v > top) ? v : top;
    }
    const int64_t o = b * N + c.i;
    const A yi = p_yb[c.i];
    if (mode == int(Neighbourhood::kInhibit)) {
      static_cast<A*>(p_out)[o] = inhibit(yi, sum, param, L.K);
    } else if (mode == int(Neighbourhood::kWinners)) {
      static_cast<uint8_t*>(p_out)[o] = wins(yi, top, param) ? 1 : 0;
    } else {
      static_cast<A*>(p_out)[o] = wins(yi, top, param) ? (p_gate != nullptr ? p_gate[o] : A(1)) : A(0);
    }
  }
}

// What the synapse pass reads of a cell and its neighbours.
template <typename A>
struct Fields {
  const A *y, *spikes, *x_pre, *x_post, *theta, *g, *lr;
  int64_t N, B;
  bool stdp;
  A thr, e_pre, inv_b;
  Rates<A> rt;

  /// The gate g_b[i] and the post cell's coefficients of sample b (s = g·lr/B).
  __device__ __forceinline__ A gate(int64_t b, int i) const { return g != nullptr ? g[b * N + i] : A(1); }
  __device__ __forceinline__ CellTerms<A> own(int64_t b, int i, A gb, A lr_i, A th_i) const {
    const int64_t o = b * N + i;
    const A yi = y != nullptr ? y[o] : A(0);
    const A zi = spikes != nullptr ? spikes[o] : (yi > thr ? A(1) : A(0));
    const A xq = (stdp && x_post != nullptr) ? x_post[o] : A(0);
    return cell_terms(rt, gb * inv_b * lr_i, zi, xq, yi, th_i);
  }
};

/// The neighbour fields of one sample: base pointers of the plane b, so a
/// synapse's reads are a 32-bit index off them (no 64-bit address per
/// synapse lives across the batch loop).
template <typename A>
struct Sample {
  const A *y, *spikes, *x_pre;
  bool stdp;
  A thr, e_pre;

  __device__ __forceinline__ Sample(const Fields<A>& F, int64_t b)
      : y(F.y != nullptr ? F.y + b * F.N : nullptr),
        spikes(F.spikes != nullptr ? F.spikes + b * F.N : nullptr),
        x_pre(F.x_pre != nullptr ? F.x_pre + b * F.N : nullptr),
        stdp(F.stdp),
        thr(F.thr),
        e_pre(F.e_pre) {}

  /// This sample's Δw of the synapse from the pre cell j (old weight w0) but
  /// the decay term: c0 + c1·w0 of synapse_terms.
  template <bool MULT>
  __device__ __forceinline__ A delta(int j, const CellTerms<A>& t, A w_min, A w_max, A w0) const {
    const A yj = y != nullptr ? y[j] : A(0);
    A zj = A(0), xj = A(0);
    if (stdp) {
      zj = spikes != nullptr ? spikes[j] : (yj > thr ? A(1) : A(0));
      xj = x_pre[j] * e_pre;  // the pre trace decays first
    }
    A c0 = A(0), c1 = A(0);
    synapse_terms<MULT>(w_min, w_max, t.p, t.q, t.r, xj, zj, yj, &c0, &c1);
    return c0 + c1 * w0;
  }
};

// The registers of a cell across the batch loop: its K old weights and K Δw
// sums (2·K values in A, constant indices only) and a bitmask of the live
// synapses. The neighbour index of a synapse is recomputed where it is used
// (a shared-memory lookup and a few integer operations): holding K indices,
// and the K·3 64-bit field addresses the compiler derives from them, across
// the batch loop is what made this kernel spill. fp32 runs at ~93 registers,
// 2 blocks of 256 threads an SM, no spills (tools/ptxas_report.py); fp64
// (2·K doubles) gets the 255 registers of one block.
template <typename W, typename A, int KT>
__global__ void __launch_bounds__(kThreads, sizeof(A) == 8 ? 1 : 2)
    synapse_kernel(const Lattice L, const PlasticityParams P, W* __restrict__ p_w, const uint8_t* __restrict__ p_m,
                   const Fields<A> F) {
  int4* s_off = shared_offsets();
  Interior I{};
  const Cell c = stencil_preamble<KT>(L, 1, s_off, &I);
  if (!c.in) return;
  const int64_t N = F.N;
  const A lo = A(P.w_min), hi = A(P.w_max);
  const A lr_i = F.lr != nullptr ? F.lr[c.i] : A(1);
  const A th_i = (P.bcm && F.theta != nullptr) ? F.theta[c.i] : A(0);
  const bool mult = P.multiplicative;
  // Δw is affine in the old w (csrc/plasticity.h), so each sample's part is
  // evaluated at the old w and one sum per synapse stays in a register
  auto delta = [&](const Sample<A>& S, int j, const CellTerms<A>& t, A w0) {
    return mult ? S.template delta<true>(j, t, lo, hi, w0) : S.template delta<false>(j, t, lo, hi, w0);
  };
  A upd = A(0), dcell = A(0);  // any winner; Σ_b of the decay coefficient
  if constexpr (KT > 0) {
    // a run-time bound, also for KT = 26: with a constant one the compiler
    // interleaves the synapses more widely than 128 registers hold (spills)
    const int K = L.K;
    W* p_wc = p_w + c.i;  // w[k, i] = p_wc[k·N]: coalesced along x
    const uint8_t* p_mc = p_m != nullptr ? p_m + c.i : nullptr;
    A wv[KT], dw[KT];  // constant indices only (every loop over k unrolled): registers
    W wr[KT];
    uint8_t mk[KT];
#pragma unroll
    for (int k = 0; k < KT; ++k) {  // every load of w and the mask in flight before the first use
      if (k < K) {
        wr[k] = load_stream(p_wc + int64_t(k) * N);
        mk[k] = p_mc == nullptr ? uint8_t(1) : p_mc[int64_t(k) * N];
      }
    }
    uint32_t live = 0;
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      wv[k] = dw[k] = A(0);
      if (k < K) {
        wv[k] = to_acc<A>(wr[k]);
        live |= uint32_t(mk[k] != 0 && nbr_of(L, c, s_off[k]) >= 0) << k;
      }
    }
    // the batch loop, with nbr(k) the pre cell of a live synapse found the
    // cheapest way that holds for the whole warp (with_nbr)
    auto batch = [&](auto nbr) {
      for (int64_t b = 0; b < F.B; ++b) {
        const A gb = F.gate(b, c.i);
        upd = gb > upd ? gb : upd;
        if (gb * lr_i == A(0)) continue;  // a sample this cell does not learn from adds exactly 0
        const CellTerms<A> t = F.own(b, c.i, gb, lr_i, th_i);
        dcell += t.d;
        const Sample<A> S(F, b);
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          if (k < K && ((live >> k) & 1u)) dw[k] += delta(S, nbr(k), t, wv[k]);
        }
      }
    };
    with_nbr(L, I, s_off, c, [&](auto nbr) {
      batch([&](int k) {
        bool on;  // true: a live synapse has its neighbour
        return nbr(k, &on);
      });
    });
    A before = A(0), after = A(0);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K && ((live >> k) & 1u)) {
        const A wn = wv[k] + dw[k] - dcell * wv[k];
        before += fabs(wv[k]);  // only live synapses: a masked NaN stays out
        after += fabs(wn);
        dw[k] = wn;
      }
    }
    const A scale = P.normalize ? normalize_scale(before, after, upd) : A(1);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K && ((live >> k) & 1u)) {
        // a weight that comes out as it went in is not written back: the
        // cells that learn nothing this step (most, under competition) cost
        // a read of w only
        const A v = clamp_weight(dw[k] * scale, lo, hi);
        if (!(v == wv[k])) store_stream(p_wc + int64_t(k) * N, from_acc<W>(v));
      }
    }
  } else {
    // any K: two sweeps over the synapses (Σ|w| before and after, then the
    // store), each recomputing w + Δw in the same order, so bit for bit alike
    for (int64_t b = 0; b < F.B; ++b) {
      const A gb = F.gate(b, c.i);
      upd = gb > upd ? gb : upd;
      if (gb * lr_i != A(0)) dcell += F.own(b, c.i, gb, lr_i, th_i).d;
    }
    auto updated = [&](int j, A w0) {
      A d = A(0);
      for (int64_t b = 0; b < F.B; ++b) {
        const A gb = F.gate(b, c.i);
        if (gb * lr_i != A(0)) d += delta(Sample<A>(F, b), j, F.own(b, c.i, gb, lr_i, th_i), w0);
      }
      return w0 + d - dcell * w0;
    };
    A before = A(0), after = A(0);
    for (int k = 0; k < L.K; ++k) {
      const int64_t wi = int64_t(k) * N + c.i;
      const int j = nbr_of(L, c, s_off[k]);
      if (j < 0 || (p_m != nullptr && !p_m[wi])) continue;
      const A w0 = to_acc<A>(p_w[wi]);
      before += fabs(w0);
      after += fabs(updated(j, w0));
    }
    const A scale = P.normalize ? normalize_scale(before, after, upd) : A(1);
    for (int k = 0; k < L.K; ++k) {
      const int64_t wi = int64_t(k) * N + c.i;
      const int j = nbr_of(L, c, s_off[k]);
      if (j < 0 || (p_m != nullptr && !p_m[wi])) continue;
      const A w0 = to_acc<A>(p_w[wi]);
      const A v = clamp_weight(updated(j, w0) * scale, lo, hi);
      if (!(v == w0)) p_w[wi] = from_acc<W>(v);
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    cells_kernel(const int64_t B, const int64_t n, const PlasticityParams P, const A* __restrict__ p_y,
                 const A* __restrict__ p_spikes, A* __restrict__ p_xpre, A* __restrict__ p_xpost,
                 A* __restrict__ p_theta) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const A thr = A(P.threshold), e_pre = A(P.decay_pre), e_post = A(P.decay_post);
  A m2 = A(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * n + i;
    if (P.bcm) m2 += p_y[o] * p_y[o];
    if (P.stdp) {  // spikes are added after the pairing
      const A z = p_spikes != nullptr ? p_spikes[o] : (p_y[o] > thr ? A(1) : A(0));
      p_xpre[o] = p_xpre[o] * e_pre + z;
      p_xpost[o] = p_xpost[o] * e_post + z;
    }
  }
  if (P.bcm) p_theta[i] = theta_update(P, p_theta[i], m2 / A(B));  // θ moves after Δw
}

template <typename W, typename A, int KT>
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const Lattice L, W* __restrict__ p_w, const uint8_t* __restrict__ p_m,
                     const A* __restrict__ p_target, const uint8_t* __restrict__ p_where) {
  int4* s_off = shared_offsets();
  load_offsets(L, 1, s_off);
  const Cell c = this_cell(L);
  if (!c.in) return;
  const int64_t N = int64_t(L.D) * L.H * L.W;
  const A ok = (p_where == nullptr || p_where[c.i]) ? A(1) : A(0);
  auto is_live = [&](int k, int64_t wi) {
    return nbr_of(L, c, s_off[k]) >= 0 && (p_m == nullptr || p_m[wi]);
  };
  A total = A(0);
  if constexpr (KT > 0) {
    const int K = L.K;  // a run-time bound, as in synapse_kernel
    A wv[KT];
    uint8_t mk[KT];
#pragma unroll
    for (int k = 0; k < KT; ++k) {  // every load of w and the mask in flight before the first use
      wv[k] = A(0);
      if (k < K) {
        wv[k] = to_acc<A>(load_stream(p_w + int64_t(k) * N + c.i));
        mk[k] = p_m == nullptr ? uint8_t(1) : p_m[int64_t(k) * N + c.i];
      }
    }
    uint32_t live = 0;
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K && mk[k] != 0 && nbr_of(L, c, s_off[k]) >= 0) {
        live |= 1u << k;
        total += fabs(wv[k]);
      }
    }
    const A scale = normalize_scale(p_target[c.i], total, ok);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K && ((live >> k) & 1u) && !(scale == A(1))) {
        store_stream(p_w + int64_t(k) * N + c.i, from_acc<W>(wv[k] * scale));
      }
    }
  } else {
    for (int k = 0; k < L.K; ++k) {
      const int64_t wi = int64_t(k) * N + c.i;
      if (is_live(k, wi)) total += fabs(to_acc<A>(p_w[wi]));
    }
    const A scale = normalize_scale(p_target[c.i], total, ok);
    for (int k = 0; k < L.K; ++k) {
      const int64_t wi = int64_t(k) * N + c.i;
      if (is_live(k, wi) && !(scale == A(1))) p_w[wi] = from_acc<W>(to_acc<A>(p_w[wi]) * scale);
    }
  }
}

/// f(W{}, A{}) for the supported pairs: fp32 arithmetic with fp32/fp16/bf16
/// weights, fp64 arithmetic with fp32/fp64 weights.
template <typename F>
const char* with_weight_types(Dtype w_t, Dtype a, F&& f) {
  if (a == Dtype::kFloat64) {
    if (w_t == Dtype::kFloat64) return f(double{}, double{});
    if (w_t == Dtype::kFloat32) return f(float{}, double{});
    return "cellkern_cuda: fp64 arithmetic takes fp32 or fp64 weights";
  }
  if (a != Dtype::kFloat32) return "cellkern_cuda: the accumulation dtype must be fp32 or fp64";
  switch (w_t) {
    case Dtype::kFloat32: return f(float{}, float{});
    case Dtype::kFloat16: return f(__half{}, float{});
    case Dtype::kBFloat16: return f(__nv_bfloat16{}, float{});
    default: return "cellkern_cuda: fp64 weights take fp64 arithmetic";
  }
}

template <typename F>
const char* with_acc(Dtype a, F&& f) {
  if (a == Dtype::kFloat64) return f(double{});
  if (a == Dtype::kFloat32) return f(float{});
  return "cellkern_cuda: the accumulation dtype must be fp32 or fp64";
}

}  // namespace

const char* neighbourhood(const Lattice& L, Dtype a, const void* y, double param, Neighbourhood mode,
                          const void* gate, void* out, void* stream) {
  if (empty_lattice(L) || L.BC == 0) return nullptr;
  const Shape sh = cell_shape(L);
  return with_acc(a, [&](auto tag) {
    using A = decltype(tag);
    CK_LAUNCH(sh, stream, neighbourhood_kernel<A>)(
        L, static_cast<const A*>(y), A(param), int(mode), static_cast<const A*>(gate), out);
    return launched();
  });
}

const char* plasticity_synapses(const Lattice& L, const PlasticityParams& P, Dtype w_t, Dtype a, void* w,
                                const uint8_t* mask, const CellFields& cf, void* stream) {
  if (empty_lattice(L)) return nullptr;
  const Shape sh = cell_shape(L);
  return with_weight_types(w_t, a, [&](auto wtag, auto atag) {
    using W = decltype(wtag);
    using A = decltype(atag);
    Fields<A> F;
    F.y = static_cast<const A*>(cf.y);
    F.spikes = static_cast<const A*>(cf.spikes);
    F.x_pre = static_cast<const A*>(cf.x_pre);
    F.x_post = static_cast<const A*>(cf.x_post);
    F.theta = static_cast<const A*>(cf.theta);
    F.g = static_cast<const A*>(cf.g);
    F.lr = static_cast<const A*>(cf.lr);
    F.N = int64_t(L.D) * L.H * L.W;
    F.B = L.BC;
    F.stdp = P.stdp;
    F.thr = A(P.threshold);
    F.e_pre = A(P.decay_pre);
    F.inv_b = L.BC > 0 ? A(1) / A(L.BC) : A(0);
    F.rt = rates<A>(P);
    return with_k(L.K, [&](auto kt) {
      CK_LAUNCH(sh, stream, synapse_kernel<W, A, decltype(kt)::value>)(
          L, P, static_cast<W*>(w), mask, F);
      return launched();
    });
  });
}

const char* plasticity_cells(int64_t B, int64_t n, const PlasticityParams& P, Dtype a, const CellFields& cf,
                             void* x_pre, void* x_post, void* theta, void* stream) {
  if (n == 0 || B == 0 || !(P.stdp || P.bcm)) return nullptr;
  return with_acc(a, [&](auto tag) {
    using A = decltype(tag);
    CK_LAUNCH(flat_shape(n), stream, cells_kernel<A>)(
        B, n, P, static_cast<const A*>(cf.y), static_cast<const A*>(cf.spikes), static_cast<A*>(x_pre),
        static_cast<A*>(x_post), static_cast<A*>(theta));
    return launched();
  });
}

const char* normalize(const Lattice& L, Dtype w_t, Dtype a, void* w, const uint8_t* mask, const void* target,
                      const uint8_t* where, void* stream) {
  if (empty_lattice(L)) return nullptr;
  if ((a == Dtype::kFloat64) != (w_t == Dtype::kFloat64)) {
    return "cellkern_cuda: normalize takes an fp64 target exactly for fp64 weights";
  }
  const Shape sh = cell_shape(L);
  return with_weight_types(w_t, a, [&](auto wtag, auto atag) {
    using W = decltype(wtag);
    using A = decltype(atag);
    return with_k(L.K, [&](auto kt) {
      CK_LAUNCH(sh, stream, normalize_kernel<W, A, decltype(kt)::value>)(
          L, static_cast<W*>(w), mask, static_cast<const A*>(target), where);
      return launched();
    });
  });
}

}  // namespace cuda
}  // namespace cellkern
