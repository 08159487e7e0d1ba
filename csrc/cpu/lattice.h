// The lattice and stencil as the CPU kernels see them, and the kernels'
// output allocation.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace cellkern {
namespace cpu {

struct Lattice {
  int64_t BC, C, D, H, W, N, K;
  bool pz, py, px;
  int64_t reach_x;  // max |dx|: the x cells [reach_x, W - reach_x) never wrap
  std::vector<int64_t> dz, dy, dx;
};

/// B·C planes of a (D, H, W) lattice with the stencil `offsets` [K, 3].
inline Lattice make_lattice(int64_t B, int64_t C, int64_t D, int64_t H, int64_t W, const at::Tensor& offsets,
                            const c10::List<bool>& periodic) {
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(1) == 3, "cellkern_cpu: offsets must be [K, 3], got ",
              offsets.sizes());
  TORCH_CHECK(periodic.size() == 3, "cellkern_cpu: periodic must have 3 entries, got ", periodic.size());
  Lattice L;
  L.C = C;
  L.BC = B * C;
  L.D = D;
  L.H = H;
  L.W = W;
  L.N = D * H * W;
  L.K = offsets.size(0);
  L.pz = periodic.get(0);
  L.py = periodic.get(1);
  L.px = periodic.get(2);
  const at::Tensor o = offsets.to(at::kLong).contiguous();
  const int64_t* p_o = o.data_ptr<int64_t>();
  for (int64_t k = 0; k < L.K; ++k) {
    L.dz.push_back(p_o[3 * k]);
    L.dy.push_back(p_o[3 * k + 1]);
    L.dx.push_back(p_o[3 * k + 2]);
  }
  L.reach_x = 0;
  for (int64_t d : L.dx) L.reach_x = std::max(L.reach_x, d < 0 ? -d : d);
  return L;
}

/// A fresh output tensor (NaN-filled while the test aid set_poison is on;
/// huge pages for very large ones). Defined in propagate.cpp.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts);

}  // namespace cpu
}  // namespace cellkern
