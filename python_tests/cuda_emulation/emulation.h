// The few CUDA facilities the kernels of csrc/cuda use, emulated on the host,
// so that python_tests/test_cuda_emulation.py runs the very kernel code on a
// machine without a GPU (csrc/cuda/common.cuh includes this header when
// CELLKERN_CUDA_EMULATION is defined).
//
// A launch runs the blocks, and the threads of each block, one after
// another. That is faithful for these kernels: a thread writes only its own
// cell's outputs and reads nothing another thread of the same launch writes;
// the one barrier (after the stencil table is filled) is covered by every
// emulated thread filling the whole table itself (load_offsets).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <vector>

using std::exp;
using std::fabs;
using std::tanh;

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() {}

template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}

namespace cellkern {
namespace cuda {

inline int4* shared_offsets() {
  static thread_local std::vector<int4> table(1 << 16);
  return table.data();
}

inline const char* launched() { return nullptr; }

/// kernel<<<shape>>>(args...) as loops over blocks and threads.
template <typename Shape, typename Kernel>
auto emulate(const Shape& sh, Kernel kernel) {
  return [sh, kernel](auto... args) {
    blockDim = sh.block;
    gridDim = sh.grid;
    for (unsigned bz = 0; bz < sh.grid.z; ++bz)
      for (unsigned by = 0; by < sh.grid.y; ++by)
        for (unsigned bx = 0; bx < sh.grid.x; ++bx) {
          blockIdx = make_uint3(bx, by, bz);
          for (unsigned tz = 0; tz < sh.block.z; ++tz)
            for (unsigned ty = 0; ty < sh.block.y; ++ty)
              for (unsigned tx = 0; tx < sh.block.x; ++tx) {
                threadIdx = make_uint3(tx, ty, tz);
                kernel(args...);
              }
        }
  };
}

}  // namespace cuda
}  // namespace cellkern

#define CK_LAUNCH(shape, stream, ...) ((void)(stream), ::cellkern::cuda::emulate((shape), __VA_ARGS__))
