// What every CUDA kernel file shares: dtype conversion, streaming loads, the
// block's copy of the stencil, the cell a thread owns, launch shapes and the
// dtype / K dispatch of the launchers. CUDA only, no torch.
//
// Thread layout of every per-cell kernel: threadIdx.x runs along x (loads of
// w[k, ·], s[·] and every per-cell field are coalesced), threadIdx.y over
// lattice rows (z, y); blockIdx.x tiles the rows, blockIdx.y the x axis.
//
// CELLKERN_CUDA_EMULATION compiles the same kernels as host C++ (the CPU
// test of python_tests/test_cuda_emulation.py): python_tests/cuda_emulation/
// emulation.h then supplies the thread indices, the intrinsics and the launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if defined(CELLKERN_CUDA_EMULATION)
#include "emulation.h"
#else
/// kernel<<<shape, stream>>>: CK_LAUNCH(shape, stream, kernel<...>)(args...)
#define CK_LAUNCH(shape, stream, ...) \
  __VA_ARGS__<<<(shape).grid, (shape).block, (shape).smem, static_cast<cudaStream_t>(stream)>>>
#endif

#include <cstdint>
#include <type_traits>

#include "../plasticity.h"
#include "../stencil.h"
#include "kernels.h"

namespace cellkern {
namespace cuda {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
/// The accumulation type of a storage type: fp64 stays fp64, all else fp32.
template <typename T>
using acc_of = typename AccOf<T>::type;

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return static_cast<A>(__half2float(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return static_cast<A>(__bfloat162float(v));
  } else {
    return static_cast<A>(v);
  }
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

/// A load that streams past the caches (evict first): w is read once per
/// call, and should not push the state rows, which neighbours reread, out of L2.
template <typename T>
__device__ __forceinline__ T load_stream(const T* p) {
  if constexpr (std::is_same_v<T, __half>) {
    return __ushort_as_half(__ldcs(reinterpret_cast<const unsigned short*>(p)));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __ushort_as_bfloat16(__ldcs(reinterpret_cast<const unsigned short*>(p)));
  } else {
    return __ldcs(p);
  }
}

template <typename T>
__device__ __forceinline__ void store_stream(T* p, T v) {
  if constexpr (std::is_same_v<T, __half>) {
    __stcs(reinterpret_cast<unsigned short*>(p), __half_as_ushort(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __stcs(reinterpret_cast<unsigned short*>(p), __bfloat16_as_ushort(v));
  } else {
    __stcs(p, v);
  }
}

/// The cell a thread owns; `in` is false for the threads past the lattice's
/// edge (they take part in the block's shared-memory setup only).
struct Cell {
  int z, y, x, i;
  bool in;
};

__device__ __forceinline__ Cell this_cell(const Lattice& L) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int x = int(blockIdx.y * blockDim.x + threadIdx.x);
  Cell c;
  c.in = row < int64_t(L.D) * L.H && x < L.W;
  const int r = c.in ? int(row) : 0;
  c.z = r / L.H;
  c.y = r - c.z * L.H;
  c.x = c.in ? x : 0;
  c.i = r * L.W + c.x;
  return c;
}

#if !defined(CELLKERN_CUDA_EMULATION)
/// The block's dynamic shared memory (sized by the launch: the stencil table).
__device__ __forceinline__ int4* shared_offsets() {
  extern __shared__ int4 ck_shared[];
  return ck_shared;
}
#endif

/// The block's copy of the stencil in shared memory: per offset the reduced
/// (dz, dy, dx) of reduce_offset32 (sign -1: the transposed stencil, -o_k).
/// Every thread of the block must call it (it ends with a barrier).
__device__ __forceinline__ void load_offsets(const Lattice& L, int sign, int4* s_off) {
#if defined(CELLKERN_CUDA_EMULATION)
  const int t = 0, n = 1;  // the emulated threads run one after another: each fills the whole table
#else
  const int t = int(threadIdx.y * blockDim.x + threadIdx.x), n = int(blockDim.x * blockDim.y);
#endif
  for (int k = t; k < L.K; k += n) {
    const int32_t* o = L.offsets + 3 * k;
    s_off[k] = make_int4(reduce_offset32(o[0], sign, L.D, L.pz), reduce_offset32(o[1], sign, L.H, L.py),
                         reduce_offset32(o[2], sign, L.W, L.px), 0);
  }
  __syncthreads();
}

/// The interior of the lattice for a stencil of at most 32 offsets (the
/// register kernels; shared memory has room for it after load_offsets'
/// table): the box of rows whose every neighbour row lies inside the lattice
/// without wrapping, the box of x likewise, and per offset its linear step
/// (dz·H + dy)·W + dx and its dx, both unreduced.
struct Interior {
  int4 rows;      // z in [x, y) and y in [z, w): an interior row
  int2 cols;      // x in [x, y): a cell whose every neighbour needs no x step either
  const int2* d;  // per offset k: (linear step, dx)
};

/// Every thread of the block must call it, after load_offsets (a barrier).
/// A stencil that reaches across an axis (|d| ≥ n) has no interior.
__device__ __forceinline__ Interior load_interior(const Lattice& L, int sign, int4* s_off) {
  int4* s_box = s_off + L.K;
  int2* s_d = reinterpret_cast<int2*>(s_off + L.K + 2);
#if defined(CELLKERN_CUDA_EMULATION)
  const int t = 0, n = 1, lanes = 1;
#else
  const int t = int(threadIdx.y * blockDim.x + threadIdx.x), n = int(blockDim.x * blockDim.y), lanes = 32;
#endif
  for (int k = t; k < L.K; k += n) {
    const int32_t* o = L.offsets + 3 * k;
    const int64_t dz = sign * int64_t(o[0]), dy = sign * int64_t(o[1]), dx = sign * int64_t(o[2]);
    s_d[k] = make_int2(int((dz * L.H + dy) * L.W + dx), int(dx));  // used only where the box is not empty
  }
  if (t < lanes) {  // warp 0: a lane per offset, then a warp-wide max
    // the most any offset reaches below and above, per axis (at most the axis)
    int r[6] = {0, 0, 0, 0, 0, 0};
    const int n_of[3] = {L.D, L.H, L.W};
    for (int k = t; k < L.K; k += lanes) {
      for (int a = 0; a < 3; ++a) {
        const int64_t d = sign * int64_t(L.offsets[3 * k + a]);
        const int lo = int(-d < n_of[a] ? -d : n_of[a]), hi = int(d < n_of[a] ? d : n_of[a]);
        r[2 * a] = lo > r[2 * a] ? lo : r[2 * a];
        r[2 * a + 1] = hi > r[2 * a + 1] ? hi : r[2 * a + 1];
      }
    }
#if !defined(CELLKERN_CUDA_EMULATION)
    for (int m = 16; m > 0; m >>= 1) {
      for (int a = 0; a < 6; ++a) r[a] = max(r[a], __shfl_xor_sync(0xffffffffu, r[a], m));
    }
#endif
    if (t == 0) {
      // an x step wraps at most once (interior_nbr) only for |dx| < W
      const bool ok = r[4] < L.W && r[5] < L.W;
      s_box[0] = make_int4(ok ? r[0] : L.D, L.D - r[1], r[2], L.H - r[3]);
      s_box[1] = make_int4(r[4], L.W - r[5], 0, 0);
    }
  }
  __syncthreads();
  return Interior{s_box[0], make_int2(s_box[1].x, s_box[1].y), s_d};
}

/// True when the cell's row is interior (the same for the whole warp: the
/// threads of a warp share a row).
__device__ __forceinline__ bool row_inside(const Interior& I, int z, int y) {
  return z >= I.rows.x && z < I.rows.y && y >= I.rows.z && y < I.rows.w;
}

/// True when every cell of the calling thread's warp is interior along x
/// too (a warp-uniform value computed without a vote: the warp's x range).
__device__ __forceinline__ bool warp_cols_inside(const Interior& I) {
  const int x0 = int(blockIdx.y * blockDim.x + (threadIdx.x & ~31u));
  return x0 >= I.cols.x && x0 + 31 < I.cols.y;
}

/// The neighbour k of the cell i (at x, in an interior row) along the
/// offset d = I.d[k]: i + step, wrapped once along x (an in-lattice cell
/// also where a zero x boundary leaves the lattice); *on is false there.
/// Branch-free: a few selects a synapse.
__device__ __forceinline__ int interior_nbr(const Lattice& L, int i, int x, int2 d, bool* on) {
  const int xx = x + d.y;
  const bool out = unsigned(xx) >= unsigned(L.W);
  *on = !out || L.px;
  return i + d.x + (out ? (xx < 0 ? L.W : -L.W) : 0);
}

/// The preamble of the register stencil kernels: the block's stencil table
/// (sign -1: the transposed stencil), the interior box when KT > 0, and this
/// thread's cell. Every thread of the block must call it (barriers).
template <int KT>
__device__ __forceinline__ Cell stencil_preamble(const Lattice& L, int sign, int4* s_off, Interior* I) {
  load_offsets(L, sign, s_off);
  if constexpr (KT > 0) *I = load_interior(L, sign, s_off);
  return this_cell(L);
}

/// The in-lattice index of the cell at c + o (o from load_offsets), -1 outside a zero boundary.
__device__ __forceinline__ int nbr_of(const Lattice& L, const Cell& c, int4 o) {
  return step_index(c.z, c.y, c.x, o.x, o.y, o.z, L.D, L.H, L.W, L.pz, L.py, L.px);
}

/// f(nbr) with nbr(k, &on) the cheapest way to the cell's neighbour k that
/// holds for the whole warp: one add (interior row, no x edge in the warp),
/// one x step (interior row), or step_index (near a face). nbr returns a
/// cell of the lattice in every case (the cell itself, or a wrapped one,
/// where there is no neighbour) and sets on to whether there is one.
template <typename F>
__device__ __forceinline__ auto with_nbr(const Lattice& L, const Interior& I, const int4* s_off, const Cell& c,
                                         F&& f) {
  if (!row_inside(I, c.z, c.y)) {
    return f([&](int k, bool* on) {
      const int j = nbr_of(L, c, s_off[k]);
      *on = j >= 0;
      return j >= 0 ? j : c.i;
    });
  }
  if (warp_cols_inside(I)) {
    return f([&](int k, bool* on) {
      *on = true;
      return c.i + I.d[k].x;
    });
  }
  return f([&](int k, bool* on) { return interior_nbr(L, c.i, c.x, I.d[k], on); });
}

/// φ(u) and φ'(u) for the activation codes of csrc/contract.h (enum Act)
/// (a warp-uniform switch). relu'(0) = 0 as in torch; NaN passes relu as in torch.
template <typename A>
__device__ __forceinline__ A act_fn(int act, A u) {
  switch (act) {
    case kTanh: return tanh(u);
    case kRelu: return u < A(0) ? A(0) : u;
    case kSigmoid: return A(1) / (A(1) + exp(-u));
    default: return u;
  }
}

template <typename A>
__device__ __forceinline__ A act_grad(int act, A u) {
  switch (act) {
    case kTanh: {
      const A t = tanh(u);
      return A(1) - t * t;
    }
    case kRelu: return u > A(0) ? A(1) : A(0);
    case kSigmoid: {
      const A sg = A(1) / (A(1) + exp(-u));
      return sg * (A(1) - sg);
    }
    default: return A(1);
  }
}

/// Threads per block of the per-cell kernels.
constexpr int kThreads = 256;

struct Shape {
  dim3 grid, block;
  size_t smem;
};

/// x tiles of 32–128 threads (the smallest power of two ≥ W), as many rows as
/// fill kThreads (a warp never spans two rows); shared memory for the stencil.
inline Shape cell_shape(const Lattice& L) {
  int bx = 32;
  while (bx < L.W && bx < 128) bx *= 2;
  const int by = kThreads / bx;
  const int64_t rows = int64_t(L.D) * L.H;
  Shape s;
  s.block = dim3(unsigned(bx), unsigned(by));
  s.grid = dim3(unsigned((rows + by - 1) / by), unsigned((L.W + bx - 1) / bx));
  s.smem = L.K > 32 ? sizeof(int4) * size_t(L.K) : sizeof(int4) * size_t(L.K + 2) + sizeof(int2) * size_t(L.K);
  return s;
}

inline bool empty_lattice(const Lattice& L) { return int64_t(L.D) * L.H * L.W == 0; }

/// One thread per element of a flat range of n.
inline Shape flat_shape(int64_t n) {
  Shape s;
  s.block = dim3(unsigned(kThreads));
  s.grid = dim3(unsigned((n + kThreads - 1) / kThreads));
  s.smem = 0;
  return s;
}

#if !defined(CELLKERN_CUDA_EMULATION)
/// nullptr when the last launch succeeded, else its error message.
inline const char* launched() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
#endif

/// f(T{}) for the storage type of t.
template <typename F>
const char* with_dtype(Dtype t, F&& f) {
  switch (t) {
    case Dtype::kFloat32: return f(float{});
    case Dtype::kFloat64: return f(double{});
    case Dtype::kFloat16: return f(__half{});
    case Dtype::kBFloat16: return f(__nv_bfloat16{});
  }
  return "cellkern_cuda: unknown dtype";
}

/// f(std::integral_constant<int, KT>{}): KT = 26 (moore, exact), 32 (any
/// K ≤ 32: the per-cell arrays stay in registers) or 0 (any K, loops).
template <typename F>
const char* with_k(int K, F&& f) {
  if (K == 26) return f(std::integral_constant<int, 26>{});
  if (K <= 32) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, 0>{});
}

}  // namespace cuda
}  // namespace cellkern
