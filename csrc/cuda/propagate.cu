// CUDA kernels of the propagation family (SPEC §2), one thread per cell:
//
//   gather_forward     a[b,c,i]  = Σ_k m[k,i]·w[k,i]·s[b,c,nbr(i,k)]
//                      (propagate: u = a + x + bias, s' = (1-α)·s + α·φ(u))
//   gather_transposed  ds[b,c,j] = r·res[b,c,j] + Σ_k m[k,j-o_k]·w[k,j-o_k]·g[b,c,j-o_k]
//   weight_grad        dw[k,i]   = m[k,i]·Σ_{b,c} d[b,c,i]·s[b,c,nbr(i,k)],
//                      d = g or d = g·α·φ'(u) (then also stored: the du of ds)
//   grad_u             du = g·α·φ'(u)
//
// The memory roof: w (K planes) is the big stream and is read exactly once,
// coalesced along x, with evict-first loads; the state (B·C planes) is read
// K times per cell, but by neighbouring threads of the same and the adjacent
// rows, so those reads hit L1/L2. A thread holds its K weights (and
// neighbour indices) in registers and reuses them for every (b, c). The
// weight gradient is a reduction over (b, c) per synapse in registers: no
// atomics. K = 26 (moore) compiles exactly; any K ≤ 32 runs the same
// register code with a run-time bound; larger stencils run plain loops.
// Where those kernels look up a neighbour, a warp of an interior row takes
// one add (no x edge in the warp) or one x step instead of the three
// bounded axis steps of step_index (with_nbr, common.cuh).
//
// Precision: T (fp32/fp16/bf16/fp64) loaded and converted, sums and u/du in
// A = fp32 (fp64 for fp64), results rounded once to T.
#include "common.cuh"

namespace cellkern {
namespace cuda {
namespace {

// PLANE (B·C = 1, K = 26): no (b, c) to reuse the weights for, so nothing is
// kept in registers (a quarter of the registers: more warps, every load in
// flight at once). Its rows inside the interior box (all but a thin shell)
// find a neighbour with one x step (interior_nbr) instead of three axis steps.
template <typename T, int KT, bool PLANE>
__global__ void __launch_bounds__(kThreads)
    gather_forward_kernel(const Lattice L, const T* __restrict__ p_s, const T* __restrict__ p_w,
                          const uint8_t* __restrict__ p_m, const T* __restrict__ p_x, const T* __restrict__ p_bias,
                          const bool propagate, const double leak, const int act, T* __restrict__ p_out,
                          acc_of<T>* __restrict__ p_u) {
  using A = acc_of<T>;
  int4* s_off = shared_offsets();
  Interior I{};
  const Cell c = stencil_preamble<KT>(L, 1, s_off, &I);
  if (!c.in) return;
  const int64_t N = int64_t(L.D) * L.H * L.W;
  const A alpha = A(leak), keep = A(1.0 - leak);
  auto epilogue = [&](int64_t bc, A acc) {
    const int64_t o = bc * N + c.i;
    if (!propagate) {
      p_out[o] = from_acc<T>(acc);
      return;
    }
    if (p_x != nullptr) acc += to_acc<A>(p_x[o]);
    if (p_bias != nullptr) acc += to_acc<A>(p_bias[(bc % L.C) * N + c.i]);
    if (p_u != nullptr) p_u[o] = acc;
    p_out[o] = from_acc<T>(keep * to_acc<A>(p_s[o]) + alpha * act_fn(act, acc));
  };
  if constexpr (PLANE) {
    // every load (w, mask, s) of a synapse independent of the others and
    // branch-free: all in flight before the first product is summed
    const T* p_wc = p_w + c.i;
    const uint8_t* p_mc = p_m + c.i;  // read only when p_m is not null
    auto gather = [&](auto nbr, auto masked) {
      A acc = A(0);
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        bool on;
        const int j = nbr(k, &on);
        const A wv = to_acc<A>(load_stream(p_wc + int64_t(k) * N));
        const A sv = to_acc<A>(p_s[j]);
        if constexpr (decltype(masked)::value) on = on & (p_mc[int64_t(k) * N] != 0);
        acc = on ? acc + wv * sv : acc;
      }
      return acc;
    };
    const A acc = with_nbr(L, I, s_off, c, [&](auto nbr) {
      return p_m == nullptr ? gather(nbr, std::false_type{}) : gather(nbr, std::true_type{});
    });
    epilogue(0, acc);
  } else if constexpr (KT > 0) {
    const int K = KT == 26 ? 26 : L.K;
    A wk[KT];
    int nb[KT];
    with_nbr(L, I, s_off, c, [&](auto nbr) {
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        wk[k] = A(0);  // a dead synapse: weight 0 on the cell's own state
        nb[k] = c.i;
        if (k < K) {
          const int64_t wi = int64_t(k) * N + c.i;
          const A wv = to_acc<A>(load_stream(p_w + wi));
          bool on;
          const int j = nbr(k, &on);
          if (on && (p_m == nullptr || p_m[wi])) {
            wk[k] = wv;
            nb[k] = j;
          }
        }
      }
    });
    for (int64_t bc = 0; bc < L.BC; ++bc) {
      const T* p_sb = p_s + bc * N;
      A acc = A(0);
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K) acc += wk[k] * to_acc<A>(p_sb[nb[k]]);
      }
      epilogue(bc, acc);
    }
  } else {
    for (int64_t bc = 0; bc < L.BC; ++bc) {
      const T* p_sb = p_s + bc * N;
      A acc = A(0);
      for (int k = 0; k < L.K; ++k) {
        const int j = nbr_of(L, c, s_off[k]);
        const int64_t wi = int64_t(k) * N + c.i;
        if (j >= 0 && (p_m == nullptr || p_m[wi])) acc += to_acc<A>(p_w[wi]) * to_acc<A>(p_sb[j]);
      }
      epilogue(bc, acc);
    }
  }
}

// The transposed stencil is again a gather, at -o_k: the cell i = j - o_k
// has j as its k-th neighbour and sends w[k,i]·g[i] back to j.
template <typename T, int KT>
__global__ void __launch_bounds__(kThreads)
    gather_transposed_kernel(const Lattice L, const acc_of<T>* __restrict__ p_g, const T* __restrict__ p_w,
                             const uint8_t* __restrict__ p_m, const T* __restrict__ p_res, const double res_coef,
                             T* __restrict__ p_out) {
  using A = acc_of<T>;
  int4* s_off = shared_offsets();
  Interior I{};
  const Cell c = stencil_preamble<KT>(L, -1, s_off, &I);
  if (!c.in) return;
  const int64_t N = int64_t(L.D) * L.H * L.W;
  const A r = A(res_coef);
  auto epilogue = [&](int64_t bc, A acc) {
    const int64_t o = bc * N + c.i;
    if (p_res != nullptr) acc += r * to_acc<A>(p_res[o]);
    p_out[o] = from_acc<T>(acc);
  };
  if constexpr (KT > 0) {
    const int K = KT == 26 ? 26 : L.K;
    A wk[KT];
    int nb[KT];
    with_nbr(L, I, s_off, c, [&](auto nbr) {
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        wk[k] = A(0);
        nb[k] = c.i;
        if (k < K) {
          bool on;
          const int src = nbr(k, &on);
          if (on) {
            const int64_t wi = int64_t(k) * N + src;
            const A wv = to_acc<A>(load_stream(p_w + wi));
            if (p_m == nullptr || p_m[wi]) {
              wk[k] = wv;
              nb[k] = src;
            }
          }
        }
      }
    });
    for (int64_t bc = 0; bc < L.BC; ++bc) {
      const A* p_gb = p_g + bc * N;
      A acc = A(0);
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K) acc += wk[k] * p_gb[nb[k]];
      }
      epilogue(bc, acc);
    }
  } else {
    for (int64_t bc = 0; bc < L.BC; ++bc) {
      const A* p_gb = p_g + bc * N;
      A acc = A(0);
      for (int k = 0; k < L.K; ++k) {
        const int src = nbr_of(L, c, s_off[k]);
        if (src < 0) continue;
        const int64_t wi = int64_t(k) * N + src;
        if (p_m == nullptr || p_m[wi]) acc += to_acc<A>(p_w[wi]) * p_gb[src];
      }
      epilogue(bc, acc);
    }
  }
}

template <typename T, int KT>
__global__ void __launch_bounds__(kThreads)
    weight_grad_kernel(const Lattice L, const T* __restrict__ p_g, const acc_of<T>* __restrict__ p_u,
                       const double leak, const int act, const T* __restrict__ p_s, const uint8_t* __restrict__ p_m,
                       T* __restrict__ p_dw, acc_of<T>* __restrict__ p_du) {
  using A = acc_of<T>;
  int4* s_off = shared_offsets();
  load_offsets(L, 1, s_off);
  const Cell c = this_cell(L);
  if (!c.in) return;
  const int64_t N = int64_t(L.D) * L.H * L.W;
  const A alpha = A(leak);
  auto d_at = [&](int64_t o) {
    A d = to_acc<A>(p_g[o]);
    if (p_u != nullptr) d = d * alpha * act_grad(act, p_u[o]);
    return d;
  };
  if constexpr (KT > 0) {
    const int K = KT == 26 ? 26 : L.K;
    A acc[KT];
    int nb[KT];
    uint32_t live = 0;
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      acc[k] = A(0);
      nb[k] = c.i;
      if (k < K) {
        const int j = nbr_of(L, c, s_off[k]);
        const bool on = j >= 0 && (p_m == nullptr || p_m[int64_t(k) * N + c.i]);
        live |= uint32_t(on) << k;
        if (j >= 0) nb[k] = j;
      }
    }
    for (int64_t bc = 0; bc < L.BC; ++bc) {
      const int64_t o = bc * N + c.i;
      const A d = d_at(o);
      if (p_du != nullptr) p_du[o] = d;
      const T* p_sb = p_s + bc * N;
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K) acc[k] += d * to_acc<A>(p_sb[nb[k]]);
      }
    }
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K) p_dw[int64_t(k) * N + c.i] = from_acc<T>(((live >> k) & 1u) ? acc[k] : A(0));
    }
  } else {
    if (p_du != nullptr) {
      for (int64_t bc = 0; bc < L.BC; ++bc) p_du[bc * N + c.i] = d_at(bc * N + c.i);
    }
    for (int k = 0; k < L.K; ++k) {
      const int j = nbr_of(L, c, s_off[k]);
      const int64_t wi = int64_t(k) * N + c.i;
      A acc = A(0);
      if (j >= 0 && (p_m == nullptr || p_m[wi])) {
        for (int64_t bc = 0; bc < L.BC; ++bc) {
          const int64_t o = bc * N + c.i;
          acc += (p_du != nullptr ? p_du[o] : d_at(o)) * to_acc<A>(p_s[bc * N + j]);
        }
      }
      p_dw[wi] = from_acc<T>(acc);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_u_kernel(const int64_t n, const T* __restrict__ p_g, const acc_of<T>* __restrict__ p_u, const double leak,
                  const int act, acc_of<T>* __restrict__ p_du) {
  using A = acc_of<T>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) p_du[i] = to_acc<A>(p_g[i]) * A(leak) * act_grad(act, p_u[i]);
}

}  // namespace

const char* gather_forward(const Lattice& L, Dtype t, const void* s, const void* w, const uint8_t* mask,
                           const void* x, const void* bias, bool propagate, double leak, int act, void* out,
                           void* u, void* stream) {
  if (empty_lattice(L)) return nullptr;
  const Shape sh = cell_shape(L);
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    return with_k(L.K, [&](auto kt) {
      constexpr int KT = decltype(kt)::value;
      if constexpr (KT == 26) {
        if (L.BC == 1) {
          CK_LAUNCH(sh, stream, gather_forward_kernel<T, KT, true>)(
              L, static_cast<const T*>(s), static_cast<const T*>(w), mask, static_cast<const T*>(x),
              static_cast<const T*>(bias), propagate, leak, act, static_cast<T*>(out), static_cast<acc_of<T>*>(u));
          return launched();
        }
      }
      CK_LAUNCH(sh, stream, gather_forward_kernel<T, KT, false>)(
          L, static_cast<const T*>(s), static_cast<const T*>(w), mask, static_cast<const T*>(x),
          static_cast<const T*>(bias), propagate, leak, act, static_cast<T*>(out), static_cast<acc_of<T>*>(u));
      return launched();
    });
  });
}

const char* gather_transposed(const Lattice& L, Dtype t, const void* g, const void* w, const uint8_t* mask,
                              const void* res, double res_coef, void* out, void* stream) {
  if (empty_lattice(L)) return nullptr;
  const Shape sh = cell_shape(L);
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    return with_k(L.K, [&](auto kt) {
      CK_LAUNCH(sh, stream, gather_transposed_kernel<T, decltype(kt)::value>)(
              L, static_cast<const acc_of<T>*>(g), static_cast<const T*>(w), mask, static_cast<const T*>(res),
              res_coef, static_cast<T*>(out));
      return launched();
    });
  });
}

const char* weight_grad(const Lattice& L, Dtype t, const void* g, const void* u, double leak, int act,
                        const void* s, const uint8_t* mask, void* dw, void* du, void* stream) {
  if (empty_lattice(L)) return nullptr;
  const Shape sh = cell_shape(L);
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    return with_k(L.K, [&](auto kt) {
      CK_LAUNCH(sh, stream, weight_grad_kernel<T, decltype(kt)::value>)(
          L, static_cast<const T*>(g), static_cast<const acc_of<T>*>(u), leak, act, static_cast<const T*>(s), mask,
          static_cast<T*>(dw), static_cast<acc_of<T>*>(du));
      return launched();
    });
  });
}

const char* grad_u(int64_t n, Dtype t, const void* g, const void* u, double leak, int act, void* du, void* stream) {
  if (n == 0) return nullptr;
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    CK_LAUNCH(flat_shape(n), stream, grad_u_kernel<T>)(
        n, static_cast<const T*>(g), static_cast<const acc_of<T>*>(u), leak, act, static_cast<acc_of<T>*>(du));
    return launched();
  });
}

}  // namespace cuda
}  // namespace cellkern
