// Index and boundary arithmetic of the lattice (SPEC §1), shared by the CPU
// kernels and the CUDA kernels. No torch headers: plain integers only.
//
// A cell (z, y, x) of a (D, H, W) lattice has the linear index
// i = (z*H + y)*W + x. Its k-th neighbour is at (z+dz, y+dy, x+dx); along a
// periodic axis the coordinate wraps (a true modulo, so offsets larger than
// the axis also wrap), along a zero axis a coordinate outside [0, n) means
// "no neighbour" (reads 0, synapse never updated).
//
// All address arithmetic is int64: lattices beyond 2^31 elements are allowed.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CK_HD __host__ __device__
#else
#define CK_HD
#endif

namespace cellkern {

/// i mod n in [0, n), for any sign of i (n > 0).
CK_HD inline int64_t wrap(int64_t i, int64_t n) {
  int64_t r = i % n;
  return r < 0 ? r + n : r;
}

/// i mod n for i in [-n, 2n): one compare instead of a division.
CK_HD inline int64_t wrap_once(int64_t i, int64_t n) { return i < 0 ? i + n : (i >= n ? i - n : i); }

/// True when 0 <= i < n.
CK_HD inline bool inside(int64_t i, int64_t n) { return i >= 0 && i < n; }

/// The coordinate i + d along an axis of size n: wrapped when periodic,
/// -1 when it leaves a zero boundary.
CK_HD inline int64_t axis_nbr(int64_t i, int64_t d, int64_t n, bool periodic) {
  const int64_t j = i + d;
  if (periodic) return (j >= -n && j < 2 * n) ? wrap_once(j, n) : wrap(j, n);
  return inside(j, n) ? j : -1;
}

/// Linear index of the row (z, y) of a (D, H, W) lattice: cells row*W .. row*W + W-1.
CK_HD inline int64_t row_index(int64_t z, int64_t y, int64_t H) { return z * H + y; }

/// Linear index of cell (z, y, x).
CK_HD inline int64_t cell_index(int64_t z, int64_t y, int64_t x, int64_t H, int64_t W) {
  return (z * H + y) * W + x;
}

/// The neighbour row (z+dz, y+dy), or -1 when it leaves a zero boundary.
CK_HD inline int64_t nbr_row(int64_t z, int64_t y, int64_t dz, int64_t dy, int64_t D, int64_t H,
                             bool periodic_z, bool periodic_y) {
  const int64_t zz = axis_nbr(z, dz, D, periodic_z);
  const int64_t yy = axis_nbr(y, dy, H, periodic_y);
  return (zz < 0 || yy < 0) ? -1 : row_index(zz, yy, H);
}

/// The interior range [lo, hi) of an axis of size n for the shift d: every
/// x in it has x + d inside [0, n) without wrapping. Empty (lo == hi) when |d| >= n.
CK_HD inline void interior_range(int64_t n, int64_t d, int64_t* lo, int64_t* hi) {
  int64_t a = d < 0 ? -d : 0;
  int64_t b = d > 0 ? n - d : n;
  if (a > n) a = n;
  if (b < a) b = a;
  *lo = a;
  *hi = b;
}

// ---- int32 coordinates (the CUDA kernels) ----
//
// A GPU thread owns one cell; 64-bit integer arithmetic costs it twice the
// instructions of 32-bit, and a few dozen index computations per cell are
// most of its instruction budget. Coordinates and in-lattice indices fit in
// int32 there (the launchers refuse lattices of 2^31 cells or more); only
// addresses that include the batch or offset plane are int64.

/// The offset d along an axis of size n as the kernels step by it: d mod n in
/// [0, n) along a periodic axis (so one compare wraps any offset, also one
/// larger than the axis), d itself along a zero axis.
CK_HD inline int reduce_offset(int64_t d, int64_t n, bool periodic) {
  return static_cast<int>(periodic ? wrap(d, n) : d);
}

/// reduce_offset of the offset sign·o (o an int32 table entry, sign ±1) in
/// 32-bit arithmetic (no 64-bit division): the same step along a periodic
/// axis; along a zero axis the offset clamped to [-n, n], which leaves the
/// axis exactly where sign·o does (and i + d cannot overflow).
CK_HD inline int reduce_offset32(int o, int sign, int n, bool periodic) {
  if (periodic) {
    const int r = (o % n) * sign;  // in (-n, n)
    return r < 0 ? r + n : r;
  }
  const int64_t d = int64_t(sign) * o;
  return static_cast<int>(d < -n ? -n : (d > n ? n : d));
}

/// The coordinate i + d of an axis of size n, d from reduce_offset: wrapped
/// with one compare when periodic, -1 when it leaves a zero boundary.
CK_HD inline int axis_step(int i, int d, int n, bool periodic) {
  const int j = i + d;
  if (periodic) return j >= n ? j - n : j;
  return (j >= 0 && j < n) ? j : -1;
}

/// The in-lattice index of the neighbour (z+dz, y+dy, x+dx), offsets from
/// reduce_offset, or -1 when it lies outside a zero boundary.
CK_HD inline int step_index(int z, int y, int x, int dz, int dy, int dx, int D, int H, int W, bool pz, bool py,
                            bool px) {
  const int zz = axis_step(z, dz, D, pz), yy = axis_step(y, dy, H, py), xx = axis_step(x, dx, W, px);
  return (zz < 0 || yy < 0 || xx < 0) ? -1 : (zz * H + yy) * W + xx;
}

}  // namespace cellkern
