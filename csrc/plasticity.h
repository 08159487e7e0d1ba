// The per-cell and per-synapse arithmetic of the plasticity rules (SPEC §4),
// shared by the CPU kernels and the CUDA kernels. No torch headers.
//
// The fused step's update of one synapse w = w[k,i] (post cell i, pre cell
// j = nbr(i,k)) is affine in w. With, per sample b, the gate g_b[i] (winner ×
// external gate) and s = g_b[i]·lr[i]/B:
//
//   p_b = s·η₊·z_b[i]                 (LTP coefficient of the post cell)
//   q_b = s·η₋·x_post_b[i]·e₋          (LTD coefficient, trace decayed first)
//   r_b = s·η_bcm·y_b[i]·(y_b[i] − θ[i])
//   d_b = s·ε
//
//   s1 = Σ_b p_b·x_pre_b[j]·e₊,  s2 = Σ_b q_b·z_b[j],  s3 = Σ_b r_b·y_b[j],  d = Σ_b d_b
//   additive:       Δw = s1 − s2 + s3 − d·w
//   multiplicative: Δw = (w_max − w)·s1 − (w − w_min)·s2 + s3 − d·w
//
// so Δw = c0 + c1·w with the (c0, c1) that synapse_terms accumulates.
#pragma once

#include "contract.h"
#include "stencil.h"

namespace cellkern {

/// The numeric rule parameters (cellkern.rules.PlasticityParams).
struct PlasticityParams {
  bool stdp, multiplicative, bcm, competition, normalize;
  double a_plus, a_minus;         // η·A₊, η·A₋
  double decay_pre, decay_post;   // e₊ = exp(-dt/τ₊), e₋ = exp(-dt/τ₋)
  double bcm_lr, bcm_decay;       // η_bcm, ε
  double tau_theta, theta_min, theta_max;
  double beta, threshold;         // inhibition strength, θ_act
  double w_min, w_max;
};

/// The op schemas pass the parameters as kParamFlags flags and kParamScalars
/// scalars, in the order of csrc/contract.h (cellkern/contract.py builds the lists).
inline PlasticityParams unpack_params(const bool* f, const double* v) {
  PlasticityParams P;
  P.stdp = f[kFlagStdp];
  P.multiplicative = f[kFlagMultiplicative];
  P.bcm = f[kFlagBcm];
  P.competition = f[kFlagCompetition];
  P.normalize = f[kFlagNormalize];
  P.a_plus = v[kScalarAPlus];
  P.a_minus = v[kScalarAMinus];
  P.decay_pre = v[kScalarDecayPre];
  P.decay_post = v[kScalarDecayPost];
  P.bcm_lr = v[kScalarBcmLr];
  P.bcm_decay = v[kScalarBcmDecay];
  P.tau_theta = v[kScalarTauTheta];
  P.theta_min = v[kScalarThetaMin];
  P.theta_max = v[kScalarThetaMax];
  P.beta = v[kScalarBeta];
  P.threshold = v[kScalarThreshold];
  P.w_min = v[kScalarWMin];
  P.w_max = v[kScalarWMax];
  return P;
}

/// The per-sample coefficients of one post cell (see the header comment).
template <typename T>
struct CellTerms {
  T p, q, r, d;
};

/// The rule's rates as the per-cell arithmetic takes them: a rule that is off
/// has rates 0, so the kernels run one branch-free formula.
template <typename T>
struct Rates {
  T a_plus, a_minus, decay_pre, decay_post, bcm_lr, bcm_decay;
};

template <typename T>
CK_HD inline Rates<T> rates(const PlasticityParams& P) {
  return {P.stdp ? T(P.a_plus) : T(0), P.stdp ? T(P.a_minus) : T(0), T(P.decay_pre), T(P.decay_post),
          P.bcm ? T(P.bcm_lr) : T(0), P.bcm ? T(P.bcm_decay) : T(0)};
}

/// Coefficients of the post cell for one sample; `scale` = g·lr/B,
/// `x_post` the trace before its decay.
template <typename T>
CK_HD inline CellTerms<T> cell_terms(const Rates<T>& k, T scale, T z, T x_post, T y, T theta) {
  return {scale * k.a_plus * z, scale * k.a_minus * (x_post * k.decay_post), scale * k.bcm_lr * y * (y - theta),
          scale * k.bcm_decay};
}

/// Adds one sample's contribution of a synapse to Δw = c0 + c1·w (see the
/// header comment); `x_pre_nbr` is the pre cell's trace after its decay.
/// T may be a scalar or a SIMD vector of synapses (S its scalar type).
template <bool MULTIPLICATIVE, typename T, typename S>
CK_HD inline void synapse_terms(S w_min, S w_max, T p, T q, T r, T x_pre_nbr, T z_nbr, T y_nbr, T* c0, T* c1) {
  const T s1 = p * x_pre_nbr, s2 = q * z_nbr, s3 = r * y_nbr;
  if constexpr (MULTIPLICATIVE) {
    *c0 += w_max * s1 + w_min * s2 + s3;  // (w_max − w)·s1 − (w − w_min)·s2 + s3
    *c1 -= s1 + s2;
  } else {
    *c0 += s1 - s2 + s3;
  }
}

/// w clamped to [lo, hi] (scalars or vectors).
template <typename T>
CK_HD inline T clamp_weight(T w, T lo, T hi) {
  return w < lo ? lo : (w > hi ? hi : w);
}

/// The heterosynaptic scale of a cell: Σ|w| before / Σ|w| after where the
/// cell learnt (`updated` > 0) and has weight left, else 1.
template <typename T>
CK_HD inline T normalize_scale(T before, T after, T updated) {
  return ((updated > 0) & (after > 0)) ? before / after : T{} + 1;
}

/// θ ← clamp(θ + (mean_b y² − θ)/τ_θ, θ_min, θ_max).
template <typename T>
CK_HD inline T theta_update(const PlasticityParams& P, T theta, T mean_y2) {
  const T t = theta + (mean_y2 - theta) / T(P.tau_theta);
  return t < T(P.theta_min) ? T(P.theta_min) : (t > T(P.theta_max) ? T(P.theta_max) : t);
}

/// y' = relu(y − β·Σ_k y[nbr] / K).
template <typename T>
CK_HD inline T inhibit(T y, T nbr_sum, T beta, int64_t K) {
  const T v = y - beta * nbr_sum / T(K);
  return v > T(0) ? v : T(0);
}

/// A cell wins where y > θ_act and y ≥ every neighbour.
template <typename T>
CK_HD inline bool wins(T y, T nbr_max, T threshold) {
  return y > threshold && y >= nbr_max;
}

}  // namespace cellkern
