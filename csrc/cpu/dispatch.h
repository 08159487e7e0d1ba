// Dispatch on the dtypes of the state and of the weights (mixed precision:
// weights may be stored below the state's precision; every sum is in the
// accumulation type).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <type_traits>

namespace cellkern {
namespace cpu {

/// f(s_t{}, w_t{}) with s_t the C++ type of `st` and w_t that of `wt`: the
/// same type, or a lower float precision under an fp32 state (any_lower:
/// also under an fp64 state).
template <bool any_lower, typename F>
void dispatch_state_weights(at::ScalarType st, at::ScalarType wt, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "cellkern_cpu_state", [&] {
    using s_t = scalar_t;
    if (wt == st) {
      f(s_t{}, s_t{});
      return;
    }
    constexpr bool lower_ok = std::is_same_v<s_t, float> || (any_lower && std::is_same_v<s_t, double>);
    if constexpr (lower_ok) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wt, "cellkern_cpu_weights", [&] {
        if constexpr (sizeof(scalar_t) < sizeof(s_t)) {
          f(s_t{}, scalar_t{});
        } else {
          TORCH_CHECK(false, "cellkern_cpu: weights of ", wt, " with a ", st, " state");
        }
      });
    } else {
      TORCH_CHECK(false, "cellkern_cpu: weights of ", wt, " with a ", st, " state");
    }
  });
}

}  // namespace cpu
}  // namespace cellkern
