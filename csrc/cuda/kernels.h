// The CUDA kernels' launchers (csrc/cuda/*.cu) as the torch glue calls them:
// raw pointers, sizes and a stream, no torch and no CUDA headers, so the glue
// (csrc/cuda/*.cpp) compiles with a plain C++ compiler.
//
// Every launcher returns nullptr on success, else the CUDA error message of
// the launch. Pointers are device pointers; `stream` is a cudaStream_t.
// Per-cell and per-sample fields are in the accumulation dtype A (fp32, fp64
// for fp64 inputs); s, w, x, bias in the storage dtype T; masks and bool
// outputs one byte per element (0/1).
#pragma once

#include <cstdint>

#include "../plasticity.h"

namespace cellkern {
namespace cuda {

enum class Dtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

/// BC planes of a (D, H, W) lattice (N = D·H·W < 2^31 cells) with the stencil
/// `offsets` (device, int32 [K, 3]) and a boundary per axis.
struct Lattice {
  int64_t BC, C;
  int D, H, W, K;
  bool pz, py, px;
  const int32_t* offsets;
};

// ---- propagation (propagate.cu) ----

/// a = Σ_k m·w·s[nbr] (propagate = false), or the fused cell update
/// u = a + x + bias, out = (1-α)·s + α·φ(u) (propagate = true; x, bias, u may
/// be null; bias [C, D, H, W]; u in A).
const char* gather_forward(const Lattice& L, Dtype t, const void* s, const void* w, const uint8_t* mask,
                           const void* x, const void* bias, bool propagate, double leak, int act, void* out,
                           void* u, void* stream);

/// out[bc,j] = r·res[bc,j] + Σ_k m[k,j-o_k]·w[k,j-o_k]·g[bc,j-o_k]; g in A,
/// res and out in T (res may be null).
const char* gather_transposed(const Lattice& L, Dtype t, const void* g, const void* w, const uint8_t* mask,
                              const void* res, double res_coef, void* out, void* stream);

/// dw[k,i] = m[k,i]·Σ_bc d[bc,i]·s[bc,nbr(i,k)] with d = g (u null) or
/// d = g·α·φ'(u) (u in A), stored in du (A) when du is not null. g, s, dw in T.
const char* weight_grad(const Lattice& L, Dtype t, const void* g, const void* u, double leak, int act,
                        const void* s, const uint8_t* mask, void* dw, void* du, void* stream);

/// du = g·α·φ'(u) elementwise over n values (g in T, u and du in A).
const char* grad_u(int64_t n, Dtype t, const void* g, const void* u, double leak, int act, void* du, void* stream);

// ---- plasticity (plasticity.cu); L.BC is the batch B ----

enum class Neighbourhood : int {
  kInhibit = 0,  // out (A) = relu(y − β·Σ_k y[nbr]/K)
  kWinners = 1,  // out (byte) = y > θ_act and y ≥ max_k y[nbr]
  kGate = 2,     // out (A) = winner · gate (gate null: 1)
};

const char* neighbourhood(const Lattice& L, Dtype a, const void* y, double param, Neighbourhood mode,
                          const void* gate, void* out, void* stream);

/// The per-cell inputs of the fused step, all in A (any may be null where
/// the rule does not read it; g = winners × gate, null: every cell wins).
struct CellFields {
  const void *y, *spikes, *x_pre, *x_post, *theta, *g, *lr;
};

/// The fused step's one read and one write of w (w in w_t; A fp32 or fp64).
const char* plasticity_synapses(const Lattice& L, const PlasticityParams& P, Dtype w_t, Dtype a, void* w,
                                const uint8_t* mask, const CellFields& F, void* stream);

/// After the synapses: x_pre ← x_pre·e₊ + z, x_post ← x_post·e₋ + z (STDP),
/// θ ← clamp(θ + (mean_b y² − θ)/τ_θ) (BCM); over B samples of n cells.
const char* plasticity_cells(int64_t B, int64_t n, const PlasticityParams& P, Dtype a, const CellFields& F,
                             void* x_pre, void* x_post, void* theta, void* stream);

/// w[k,i] ← w[k,i]·target[i]/Σ_k|w[k,i]| on live synapses where Σ > 0 (and where[i]).
const char* normalize(const Lattice& L, Dtype w_t, Dtype a, void* w, const uint8_t* mask, const void* target,
                      const uint8_t* where, void* stream);

// ---- the mixing form (mixing.cu): W [K, C_out, C_in, D, H, W]; L.BC is B·C_in ----

/// a[b,o,i] = Σ_k m·Σ_c W[k,o,c,i]·s[b,c,nbr(i,k)]: into u (A) when u is not
/// null, else into out (T). s, w in T.
const char* mixing_sum(const Lattice& L, int B, int Ci, int Co, Dtype t, const void* s, const void* w,
                       const uint8_t* mask, void* out, void* u, void* stream);

/// out[b,c,j] = r·res[b,c,j] + Σ_k m[k,j−o_k]·Σ_o W[k,o,c,j−o_k]·g[b,o,j−o_k];
/// g in A, w, res (may be null) and out in T.
const char* mixing_transposed(const Lattice& L, int B, int Ci, int Co, Dtype t, const void* g, const void* w,
                              const uint8_t* mask, const void* res, double res_coef, void* out, void* stream);

/// dW[k,o,c,i] = m[k,i]·Σ_b g[b,o,i]·s[b,c,nbr(i,k)] (0 where the synapse does
/// not exist); g and s in A, dW in T.
const char* mixing_weight_grad(const Lattice& L, int B, int Ci, int Co, Dtype t, const void* g, const void* s,
                               const uint8_t* mask, void* dw, void* stream);

/// u ← a + x + bias, out = (1−α)·s + α·φ(u) over B samples of C channels and
/// n cells; act 4 is "triangle" (relu(u − mean_c u)). u in A; s, x, bias, out in T.
const char* mixing_cell_update(int64_t B, int C, int64_t n, Dtype t, const void* s, const void* x, const void* bias,
                               double leak, int act, void* out, void* u, void* stream);

/// du = α·gᵀ·∂φ/∂u (act 4: triangle) over B samples of C channels and n cells; g in T, u and du in A.
const char* mixing_grad_u(int64_t B, int C, int64_t n, Dtype t, const void* g, const void* u, double leak, int act,
                          void* du, void* stream);

/// The competitive Hebbian step, in place on w (w_t) and beta (A): s in A,
/// scratch up [B, C_out, D, H, W], q and scale [C_out, D, H, W] in A.
const char* competitive_hebbian(const Lattice& L, int B, int Ci, int Co, Dtype w_t, void* w, const void* s,
                                const uint8_t* mask, void* beta, void* up, void* q, void* scale, double eta,
                                double tau, double eta_beta, bool wins, void* stream);

}  // namespace cuda
}  // namespace cellkern
