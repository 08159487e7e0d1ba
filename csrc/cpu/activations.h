// Activations of the propagate family and their derivatives (SPEC §2), as
// branch-free inline functions the kernels' `omp simd` loops vectorise.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../contract.h"

namespace cellkern {
namespace cpu {

// The activation codes (enum Act: kIdentity, kTanh, kRelu, kSigmoid) are
// cellkern's, from csrc/contract.h.

// ---- activations (float: a vectorisable rational tanh; double: libm) ----

// tanh(x) on [-7.905, 7.905] as the rational function p(x)/q(x) of Eigen's
// generic_fast_tanh_float (max error a few ulp); ±1 beyond. Branch-free so
// that `omp simd` loops vectorise it.
inline float tanh_fast(float x) {
  const float c = 7.90531110763549805f;
  const float xc = std::min(std::max(x, -c), c);
  const float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return std::abs(x) < 0.0004f ? x : p / q;
}
inline double tanh_fast(double x) { return std::tanh(x); }

template <int64_t ACT, typename T>
inline T act_fn(T u) {
  if constexpr (ACT == kTanh) {
    return tanh_fast(u);
  } else if constexpr (ACT == kRelu) {
    return u < T(0) ? T(0) : u;  // NaN passes through, as torch.relu
  } else if constexpr (ACT == kSigmoid) {
    return T(0.5) + T(0.5) * tanh_fast(T(0.5) * u);
  } else {
    return u;
  }
}

template <int64_t ACT, typename T>
inline T act_grad(T u) {
  if constexpr (ACT == kTanh) {
    const T t = tanh_fast(u);
    return T(1) - t * t;
  } else if constexpr (ACT == kRelu) {
    return u > T(0) ? T(1) : T(0);  // relu'(0) = 0
  } else if constexpr (ACT == kSigmoid) {
    const T sg = T(0.5) + T(0.5) * tanh_fast(T(0.5) * u);
    return sg * (T(1) - sg);
  } else {
    return T(1);
  }
}

// Calls f(std::integral_constant<int64_t, ACT>{}) for the runtime code act.
template <typename F>
void dispatch_act(int64_t act, F&& f) {
  switch (act) {
    case kIdentity: f(std::integral_constant<int64_t, kIdentity>{}); break;
    case kTanh: f(std::integral_constant<int64_t, kTanh>{}); break;
    case kRelu: f(std::integral_constant<int64_t, kRelu>{}); break;
    case kSigmoid: f(std::integral_constant<int64_t, kSigmoid>{}); break;
    default: TORCH_CHECK(false, "cellkern_cpu: act must be 0 (identity), 1 (tanh), 2 (relu) or 3 (sigmoid), got ", act);
  }
}

}  // namespace cpu
}  // namespace cellkern
