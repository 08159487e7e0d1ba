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
//
// Compile time: the fused step's sweep (plasticity_pass.h) is instantiated
// per (w dtype, accumulation dtype) in plasticity_{f32,f16,bf16,f64}.cpp, so
// that the groups compile in parallel; inside it, only the innermost row
// sweep is compiled per flag set (multiplicative × normalise × live × batch
// sums: 16 sweep_row copies), the per-row work around it once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

// The kernels below vectorise through explicit SIMD types and `omp simd`
// loops; GCC 12's basic-block (SLP) vectoriser adds nothing to them and
// crashes on the fp16 instantiations, so it is off for this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-slp-vectorize")
#endif

#include "../plasticity.h"
#include "../stencil.h"
#include "lattice.h"
#include "plasticity_rows.h"

namespace cellkern {
namespace cpu {
namespace {


// out[b,i] = relu(y[b,i] − β·Σ_k y[b,nbr] / K)  (mode 0)  or
// out[b,i] = y[b,i] > θ and y[b,i] ≥ max_k y[b,nbr] (mode 1)
template <int MODE, typename A, typename O>
void neighbourhood_pass(const Lattice& L, int64_t B, const A* y, A param, O* out) {
  const int64_t W = L.W, N = L.N, K = L.K;
  at::parallel_for(0, L.D * L.H, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, K * W * B)),
                   [&](int64_t r0, int64_t r1) {
    RowNeighbours nb(L), nb_ahead(L);
    PaddedRows<A> pad(L);
    std::vector<A> red(W);
    std::vector<const A*> nbr(K);
    for (int64_t row = r0; row < r1; ++row) {
      if (row + kPrefetchRows < r1) {
        const int64_t ra = row + kPrefetchRows;
        nb_ahead.build(L, ra / L.H, ra % L.H);
        prefetch_new_rows(L, nb_ahead, y, B);
      }
      nb.build(L, row / L.H, row % L.H);
      for (int64_t b = 0; b < B; ++b) {
        const A* p_y = y + b * N;
        pad.load(L, nb, row / L.H, row % L.H, b, p_y, Identity<A>());
        pad.pointers(nb, L, nbr.data());
        reduce_rows<MODE == 1>(nbr.data(), K, W, red.data());
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


// After the sweep: the pre traces decay and take the spikes (x_post and θ
// were updated row by row, row_state).
template <typename A>
void state_pass(const Lattice& L, const PlasticityParams P, const CellFields<A> F, A* x_pre) {
  if (!P.stdp) return;
  const int64_t N = L.N, B = F.B;
  const A thr = A(P.threshold), e_pre = A(P.decay_pre);
  at::parallel_for(0, N, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t bb = b * N;
      if (F.spikes != nullptr) {
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) x_pre[bb + i] = x_pre[bb + i] * e_pre + F.spikes[bb + i];
      } else {
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) x_pre[bb + i] = x_pre[bb + i] * e_pre + (F.y[bb + i] > thr ? A(1) : A(0));
      }
    }
  });
}

template <typename w_t, typename A>
void normalize_pass(const Lattice& L, w_t* w, const bool* m, const A* target, const bool* where) {
  const int64_t W = L.W, N = L.N, K = L.K;
  at::parallel_for(0, L.D * L.H, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, K * W)),
                   [&](int64_t r0, int64_t r1) {
    RowNeighbours nb(L);
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
            total[x] = normalize_scale(target[base + x], total[x], ok ? A(1) : A(0));
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

// A scratch tensor shaped like t, reused from call to call (per thread):
// a fresh 8 MB buffer per step would cost its page faults every time.
at::Tensor scratch_like(const at::Tensor& t) {
  thread_local at::Tensor cache;
  if (t.nbytes() > (size_t(256) << 20)) return at::empty(t.sizes(), t.options());  // not held for good
  if (!cache.defined() || cache.scalar_type() != t.scalar_type() || cache.numel() < t.numel()) {
    cache = at::empty({t.numel()}, t.options());
  }
  return cache.narrow(0, 0, t.numel()).view(t.sizes());
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
  TORCH_CHECK(flags.size() == kParamFlags && scalars.size() == kParamScalars,
              "cellkern_cpu: plasticity_ takes ", kParamFlags, " flags and ", kParamScalars, " scalars");
  bool f[kParamFlags];
  for (int i = 0; i < kParamFlags; ++i) f[i] = flags.get(i);
  const PlasticityParams P = unpack_params(f, scalars.data());

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
    at::Tensor yp = scratch_like(ya);
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
    const CellFields<A> F{B, opt_data<A>(ya), opt_data<A>(spa), opt_data<A>(xpa), mut_data<A>(xqa),
                          mut_data<A>(tha), opt_data<A>(ga), opt_data<A>(lra)};
    if constexpr (std::is_same_v<A, double>) {
      // fp64 arithmetic: fp16/bf16 weights go through an fp64 copy (rounded
      // back once, as the reference does), which keeps the instantiations few
      if (w.scalar_type() == at::kFloat) {
        plasticity_pass<float, A>(L, P, w.data_ptr<float>(), p_m, F);
      } else {
        at::Tensor wd = w.scalar_type() == at::kDouble ? w : w.to(at::kDouble);
        plasticity_pass<double, A>(L, P, wd.data_ptr<double>(), p_m, F);
        if (!wd.is_same(w)) w.copy_(wd);
      }
    } else {
      TORCH_CHECK(w.scalar_type() != at::kDouble, "cellkern_cpu: fp64 weights take fp64 arithmetic");
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "plasticity_", [&] {
        if constexpr (!std::is_same_v<scalar_t, double>) {
          plasticity_pass<scalar_t, A>(L, P, w.data_ptr<scalar_t>(), p_m, F);
        }
      });
    }
    state_pass<A>(L, P, F, mut_data<A>(xpa));
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
