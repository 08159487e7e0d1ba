// CUDA kernels of the channel-mixing (locally connected) form, SPEC §11.
// W is [K, C_out, C_in, D, H, W] (each (k, o, c) plane contiguous over
// cells), the mask [K, D, H, W], s [B, C_in, D, H, W]:
//
//   mixing_sum          a[b,o,i]  = Σ_k m[k,i] · Σ_c W[k,o,c,i] · s[b,c,nbr(i,k)]
//   mixing_transposed   ds[b,c,j] = r·res[b,c,j] + Σ_k m[k,j−o_k] · Σ_o W[k,o,c,j−o_k] · g[b,o,j−o_k]
//   mixing_weight_grad  dW[k,o,c,i] = m[k,i] · Σ_b g[b,o,i] · s[b,c,nbr(i,k)]
//   mixing_cell_update  s' = (1−α)·s + α·φ(u), u = a + x + bias (φ also "triangle")
//   mixing_grad_u       du = α·gᵀ·∂φ/∂u
//   hebbian_winners     p = softmax_o((u + β)/τ) (τ = 0: one-hot argmax), the per-unit
//                       q = Σ_b p·u and η/n, and β ← β − η_β·(mean_b p − 1/C_out)
//   hebbian_update      W += η/n · (Σ_b p·s[nbr] − q·W) on live synapses
//
// One thread per cell (threadIdx.x along x: every load of W, s and g is
// coalesced), and per thread a register tile of kOT output channels × kBT
// samples (or kOT × kBT channel pairs): each weight loaded once per group of
// samples, each state value once per group of channels; blockIdx.z walks the
// channel groups. The Hebbian step runs as three launches (u, then p and β,
// then the update): W is read twice (L2 keeps little of it between the
// launches on a large lattice) and written once.
//
// Precision: T loaded and converted, sums in A = fp32 (fp64 for fp64), results
// rounded once to T.
#include "common.cuh"

namespace cellkern {
namespace cuda {
namespace {

constexpr int kOT = 4;  // output channels per thread
constexpr int kBT = 4;  // samples (or input channels) per thread and pass

/// The neighbour k of the cell c (reduced offset o), or -1.
__device__ __forceinline__ int mix_nbr(const Lattice& L, const Cell& c, int4 o) { return nbr_of(L, c, o); }

// a[b, o, i] for o in the block's channel group: into u (A) when it is set,
// else into out (S). W stored as WT (S itself, or below it when S is A).
template <typename S, typename WT>
__global__ void __launch_bounds__(kThreads)
    mixing_sum_kernel(const Lattice L, int B, int Ci, int Co, const S* __restrict__ p_s, const WT* __restrict__ p_w,
                      const uint8_t* __restrict__ p_m, S* __restrict__ p_out, acc_of<S>* __restrict__ p_u) {
  using A = acc_of<S>;
  int4* s_off = shared_offsets();
  load_offsets(L, 1, s_off);
  const Cell c = this_cell(L);
  if (!c.in) return;
  const int64_t N = int64_t(L.D) * L.H * L.W;
  const int o0 = int(blockIdx.z) * kOT;
  for (int b0 = 0; b0 < B; b0 += kBT) {
    A acc[kOT][kBT];
#pragma unroll
    for (int o = 0; o < kOT; ++o)
#pragma unroll
      for (int b = 0; b < kBT; ++b) acc[o][b] = A(0);
    for (int k = 0; k < L.K; ++k) {
      const int j = mix_nbr(L, c, s_off[k]);
      if (j < 0 || (p_m != nullptr && !p_m[int64_t(k) * N + c.i])) continue;
      for (int ci = 0; ci < Ci; ++ci) {
        A sv[kBT];
#pragma unroll
        for (int b = 0; b < kBT; ++b) {
          sv[b] = b0 + b < B ? to_acc<A>(p_s[(int64_t(b0 + b) * Ci + ci) * N + j]) : A(0);
        }
#pragma unroll
        for (int o = 0; o < kOT; ++o) {
          if (o0 + o < Co) {
            const A wv = to_acc<A>(p_w[((int64_t(k) * Co + o0 + o) * Ci + ci) * N + c.i]);
#pragma unroll
            for (int b = 0; b < kBT; ++b) acc[o][b] += wv * sv[b];
          }
        }
      }
    }
#pragma unroll
    for (int o = 0; o < kOT; ++o) {
#pragma unroll
      for (int b = 0; b < kBT; ++b) {
        if (o0 + o < Co && b0 + b < B) {
          const int64_t at = (int64_t(b0 + b) * Co + o0 + o) * N + c.i;
          if (p_u != nullptr) {
            p_u[at] = acc[o][b];
          } else {
            p_out[at] = from_acc<S>(acc[o][b]);
          }
        }
      }
    }
  }
}

// ds[b, c, j] for c in the block's channel group: the source cell i = j − o_k
// mixes g back through Wᵀ. g in A; res (T, may be null) scaled by res_coef.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mixing_transposed_kernel(const Lattice L, int B, int Ci, int Co, const acc_of<T>* __restrict__ p_g,
                             const T* __restrict__ p_w, const uint8_t* __restrict__ p_m, const T* __restrict__ p_res,
                             const double res_coef, T* __restrict__ p_out) {
  using A = acc_of<T>;
  int4* s_off = shared_offsets();
  load_offsets(L, -1, s_off);
  const Cell c = this_cell(L);
  if (!c.in) return;
  const int64_t N = int64_t(L.D) * L.H * L.W;
  const int c0 = int(blockIdx.z) * kOT;
  for (int b0 = 0; b0 < B; b0 += kBT) {
    A acc[kOT][kBT];
#pragma unroll
    for (int q = 0; q < kOT; ++q)
#pragma unroll
      for (int b = 0; b < kBT; ++b) acc[q][b] = A(0);
    for (int k = 0; k < L.K; ++k) {
      const int i = mix_nbr(L, c, s_off[k]);
      if (i < 0 || (p_m != nullptr && !p_m[int64_t(k) * N + i])) continue;
      for (int o = 0; o < Co; ++o) {
        A gv[kBT];
#pragma unroll
        for (int b = 0; b < kBT; ++b) gv[b] = b0 + b < B ? p_g[(int64_t(b0 + b) * Co + o) * N + i] : A(0);
#pragma unroll
        for (int q = 0; q < kOT; ++q) {
          if (c0 + q < Ci) {
            const A wv = to_acc<A>(p_w[((int64_t(k) * Co + o) * Ci + c0 + q) * N + i]);
#pragma unroll
            for (int b = 0; b < kBT; ++b) acc[q][b] += wv * gv[b];
          }
        }
      }
    }
    const A r = A(res_coef);
#pragma unroll
    for (int q = 0; q < kOT; ++q) {
#pragma unroll
      for (int b = 0; b < kBT; ++b) {
        if (c0 + q < Ci && b0 + b < B) {
          const int64_t at = (int64_t(b0 + b) * Ci + c0 + q) * N + c.i;
          A v = acc[q][b];
          if (p_res != nullptr) v += r * to_acc<A>(p_res[at]);
          p_out[at] = from_acc<T>(v);
        }
      }
    }
  }
}

// The outer products Σ_b g[b, o, i]·s[b, c, nbr(i, k)] for the block's tile of
// kOT output × kBT input channels (blockIdx.z = o-group · c-groups + c-group),
// per live synapse k: dW = m·that (g in A), or the Hebbian update of W.
template <typename T, bool HEBB>
__global__ void __launch_bounds__(kThreads)
    mixing_outer_kernel(const Lattice L, int B, int Ci, int Co, const acc_of<T>* __restrict__ p_g,
                        const acc_of<T>* __restrict__ p_s, const uint8_t* __restrict__ p_m, T* __restrict__ p_dw,
                        const acc_of<T>* __restrict__ p_q, const acc_of<T>* __restrict__ p_scale) {
  using A = acc_of<T>;
  int4* s_off = shared_offsets();
  load_offsets(L, 1, s_off);
  const Cell c = this_cell(L);
  if (!c.in) return;
  const int64_t N = int64_t(L.D) * L.H * L.W;
  const int groups_c = (Ci + kBT - 1) / kBT;
  const int o0 = int(blockIdx.z) / groups_c * kOT, c0 = int(blockIdx.z) % groups_c * kBT;
  for (int k = 0; k < L.K; ++k) {
    const int j = mix_nbr(L, c, s_off[k]);
    const bool live = j >= 0 && (p_m == nullptr || p_m[int64_t(k) * N + c.i]);
    if (HEBB && !live) continue;  // dead synapses never change
    A acc[kOT][kBT];
#pragma unroll
    for (int o = 0; o < kOT; ++o)
#pragma unroll
      for (int q = 0; q < kBT; ++q) acc[o][q] = A(0);
    if (live) {
      for (int b = 0; b < B; ++b) {
        A gv[kOT], sv[kBT];
#pragma unroll
        for (int o = 0; o < kOT; ++o) gv[o] = o0 + o < Co ? p_g[(int64_t(b) * Co + o0 + o) * N + c.i] : A(0);
#pragma unroll
        for (int q = 0; q < kBT; ++q) sv[q] = c0 + q < Ci ? p_s[(int64_t(b) * Ci + c0 + q) * N + j] : A(0);
#pragma unroll
        for (int o = 0; o < kOT; ++o)
#pragma unroll
          for (int q = 0; q < kBT; ++q) acc[o][q] += gv[o] * sv[q];
      }
    }
#pragma unroll
    for (int o = 0; o < kOT; ++o) {
#pragma unroll
      for (int q = 0; q < kBT; ++q) {
        if (o0 + o < Co && c0 + q < Ci) {
          const int64_t at = ((int64_t(k) * Co + o0 + o) * Ci + c0 + q) * N + c.i;
          if constexpr (HEBB) {
            const int64_t oi = int64_t(o0 + o) * N + c.i;
            const A wv = to_acc<A>(p_dw[at]);
            p_dw[at] = from_acc<T>(wv + p_scale[oi] * (acc[o][q] - p_q[oi] * wv));
          } else {
            p_dw[at] = from_acc<T>(acc[o][q]);
          }
        }
      }
    }
  }
}

// s' = (1−α)·s + α·φ(u), u = a + x + bias, over the cells of B samples (C
// channels each): u (A) holds a on entry and u on exit.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mixing_cell_update_kernel(int64_t B, int C, int64_t N, const T* __restrict__ p_s, const T* __restrict__ p_x,
                              const T* __restrict__ p_bias, const double leak, const int act, T* __restrict__ p_out,
                              acc_of<T>* __restrict__ p_u) {
  using A = acc_of<T>;
  const int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= B * N) return;
  const int64_t b = q / N, i = q % N;
  const A alpha = A(leak), keep = A(1.0 - leak);
  A mean = A(0);
  for (int o = 0; o < C; ++o) {
    const int64_t at = (b * C + o) * N + i;
    A u = p_u[at];
    if (p_x != nullptr) u += to_acc<A>(p_x[at]);
    if (p_bias != nullptr) u += to_acc<A>(p_bias[int64_t(o) * N + i]);
    p_u[at] = u;
    mean += u;
  }
  mean /= A(C);
  for (int o = 0; o < C; ++o) {
    const int64_t at = (b * C + o) * N + i;
    const A u = p_u[at];
    A phi;
    if (act == 4) {
      const A v = u - mean;
      phi = v < A(0) ? A(0) : v;
    } else {
      phi = act_fn(act, u);
    }
    p_out[at] = from_acc<T>(keep * to_acc<A>(p_s[at]) + alpha * phi);
  }
}

// du = α·gᵀ·∂φ/∂u (triangle: r = (u > mean_c u), du = r·αg − mean_c(r·αg)).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mixing_grad_u_kernel(int64_t B, int C, int64_t N, const T* __restrict__ p_g, const acc_of<T>* __restrict__ p_u,
                         const double leak, const int act, acc_of<T>* __restrict__ p_du) {
  using A = acc_of<T>;
  const int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= B * N) return;
  const int64_t b = q / N, i = q % N;
  const A alpha = A(leak);
  if (act != 4) {
    for (int o = 0; o < C; ++o) {
      const int64_t at = (b * C + o) * N + i;
      p_du[at] = to_acc<A>(p_g[at]) * alpha * act_grad(act, p_u[at]);
    }
    return;
  }
  A mean = A(0);
  for (int o = 0; o < C; ++o) mean += p_u[(b * C + o) * N + i];
  mean /= A(C);
  A rg_mean = A(0);
  for (int o = 0; o < C; ++o) {
    const int64_t at = (b * C + o) * N + i;
    const A rg = p_u[at] > mean ? alpha * to_acc<A>(p_g[at]) : A(0);
    p_du[at] = rg;
    rg_mean += rg;
  }
  rg_mean /= A(C);
  for (int o = 0; o < C; ++o) p_du[(b * C + o) * N + i] -= rg_mean;
}

// Per cell: p[b, o] = softmax_o((u + β)/τ) (in place of u), q = Σ_b p·u,
// scale = η/n, and β ← β − η_β·(mean_b p − 1/C_out).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    hebbian_winners_kernel(int B, int Co, int64_t N, A* __restrict__ p_up, A* __restrict__ p_beta,
                           A* __restrict__ p_q, A* __restrict__ p_scale, const double eta, const double tau,
                           const double eta_beta, const bool wins) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  for (int o = 0; o < Co; ++o) {
    p_q[int64_t(o) * N + i] = A(0);
    p_scale[int64_t(o) * N + i] = A(0);  // Σ_b p for now
  }
  for (int b = 0; b < B; ++b) {
    A* up = p_up + int64_t(b) * Co * N + i;
    A zmax = -INFINITY;
    int best = 0;
    for (int o = 0; o < Co; ++o) {
      const A z = up[int64_t(o) * N] + p_beta[int64_t(o) * N + i];
      if (z > zmax || o == 0) {
        zmax = z;
        best = o;
      }
    }
    A zsum = A(0);
    if (tau > 0) {
      for (int o = 0; o < Co; ++o) {
        zsum += exp((up[int64_t(o) * N] + p_beta[int64_t(o) * N + i] - zmax) / A(tau));
      }
    }
    for (int o = 0; o < Co; ++o) {
      const A u = up[int64_t(o) * N];
      const A p = tau > 0 ? exp((u + p_beta[int64_t(o) * N + i] - zmax) / A(tau)) / zsum : A(o == best ? 1 : 0);
      p_q[int64_t(o) * N + i] += p * u;
      p_scale[int64_t(o) * N + i] += p;
      up[int64_t(o) * N] = p;
    }
  }
  for (int o = 0; o < Co; ++o) {
    const int64_t oi = int64_t(o) * N + i;
    const A psum = p_scale[oi];
    p_beta[oi] -= A(eta_beta) * (psum / A(B) - A(1) / A(Co));
    p_scale[oi] = A(eta) / (wins ? A(1) + psum : A(B));
  }
}

Shape mixing_shape(const Lattice& L, int groups) {
  Shape sh = cell_shape(L);
  sh.grid.z = unsigned(groups);
  sh.smem = sizeof(int4) * size_t(L.K);
  return sh;
}

}  // namespace

const char* mixing_sum(const Lattice& L, int B, int Ci, int Co, Dtype t, const void* s, const void* w,
                       const uint8_t* mask, void* out, void* u, void* stream) {
  if (empty_lattice(L) || B == 0 || Co == 0) return nullptr;
  const Shape sh = mixing_shape(L, (Co + kOT - 1) / kOT);
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    CK_LAUNCH(sh, stream, mixing_sum_kernel<T, T>)(L, B, Ci, Co, static_cast<const T*>(s), static_cast<const T*>(w),
                                                 mask, static_cast<T*>(out), static_cast<acc_of<T>*>(u));
    return launched();
  });
}

const char* mixing_transposed(const Lattice& L, int B, int Ci, int Co, Dtype t, const void* g, const void* w,
                              const uint8_t* mask, const void* res, double res_coef, void* out, void* stream) {
  if (empty_lattice(L) || B == 0 || Ci == 0) return nullptr;
  const Shape sh = mixing_shape(L, (Ci + kOT - 1) / kOT);
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    CK_LAUNCH(sh, stream, mixing_transposed_kernel<T>)(L, B, Ci, Co, static_cast<const acc_of<T>*>(g),
                                                        static_cast<const T*>(w), mask, static_cast<const T*>(res),
                                                        res_coef, static_cast<T*>(out));
    return launched();
  });
}

const char* mixing_weight_grad(const Lattice& L, int B, int Ci, int Co, Dtype t, const void* g, const void* s,
                               const uint8_t* mask, void* dw, void* stream) {
  if (empty_lattice(L) || Ci == 0 || Co == 0) return nullptr;
  const Shape sh = mixing_shape(L, ((Co + kOT - 1) / kOT) * ((Ci + kBT - 1) / kBT));
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_of<T>;
    CK_LAUNCH(sh, stream, mixing_outer_kernel<T, false>)(L, B, Ci, Co, static_cast<const A*>(g),
                                                          static_cast<const A*>(s), mask, static_cast<T*>(dw),
                                                          nullptr, nullptr);
    return launched();
  });
}

const char* mixing_cell_update(int64_t B, int C, int64_t N, Dtype t, const void* s, const void* x, const void* bias,
                               double leak, int act, void* out, void* u, void* stream) {
  if (B * N == 0 || C == 0) return nullptr;
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    CK_LAUNCH(flat_shape(B * N), stream, mixing_cell_update_kernel<T>)(
        B, C, N, static_cast<const T*>(s), static_cast<const T*>(x), static_cast<const T*>(bias), leak, act,
        static_cast<T*>(out), static_cast<acc_of<T>*>(u));
    return launched();
  });
}

const char* mixing_grad_u(int64_t B, int C, int64_t N, Dtype t, const void* g, const void* u, double leak, int act,
                          void* du, void* stream) {
  if (B * N == 0 || C == 0) return nullptr;
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    CK_LAUNCH(flat_shape(B * N), stream, mixing_grad_u_kernel<T>)(
        B, C, N, static_cast<const T*>(g), static_cast<const acc_of<T>*>(u), leak, act, static_cast<acc_of<T>*>(du));
    return launched();
  });
}

const char* competitive_hebbian(const Lattice& L, int B, int Ci, int Co, Dtype w_t, void* w, const void* s,
                                const uint8_t* mask, void* beta, void* up, void* q, void* scale, double eta,
                                double tau, double eta_beta, bool wins, void* stream) {
  if (empty_lattice(L) || B == 0 || Co == 0 || Ci == 0) return nullptr;
  const int64_t N = int64_t(L.D) * L.H * L.W;
  return with_dtype(w_t, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_of<T>;
    // u = the mixing sum, read from s in A
    const Shape su = mixing_shape(L, (Co + kOT - 1) / kOT);
    CK_LAUNCH(su, stream, mixing_sum_kernel<A, T>)(L, B, Ci, Co, static_cast<const A*>(s), static_cast<const T*>(w),
                                                   mask, nullptr, static_cast<A*>(up));
    const char* err = launched();
    if (err != nullptr) return err;
    CK_LAUNCH(flat_shape(N), stream, hebbian_winners_kernel<A>)(B, Co, N, static_cast<A*>(up), static_cast<A*>(beta),
                                                                static_cast<A*>(q), static_cast<A*>(scale), eta, tau,
                                                                eta_beta, wins);
    err = launched();
    if (err != nullptr) return err;
    const Shape sw = mixing_shape(L, ((Co + kOT - 1) / kOT) * ((Ci + kBT - 1) / kBT));
    CK_LAUNCH(sw, stream, mixing_outer_kernel<T, true>)(L, B, Ci, Co, static_cast<const A*>(up),
                                                         static_cast<const A*>(s), mask, static_cast<T*>(w),
                                                         static_cast<const A*>(q), static_cast<const A*>(scale));
    return launched();
  });
}

}  // namespace cuda
}  // namespace cellkern
