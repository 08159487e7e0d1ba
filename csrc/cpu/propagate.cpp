// Fused CPU kernels of the propagation family (SPEC §2).
//
//   aggregate   a[b,c,i]  = Σ_k m[k,i]·w[k,i]·s[b,c,nbr(i,k)]
//   transposed  ds[b,c,j] = Σ_k m[k,j-o_k]·w[k,j-o_k]·g[b,c,j-o_k]
//   weight_grad dw[k,i]   = m[k,i]·Σ_{b,c} g[b,c,i]·s[b,c,nbr(i,k)]
//   propagate   s'        = (1-α)·s + α·φ(aggregate + x + bias)
//
// Every pass is parallel over lattice rows (z, y): a thread owns whole rows
// of its output, so no pass needs atomics. Per row it collects one product
// term per offset k (the weight row, contiguous along x, and the shifted
// state row) and sums them with row_dot: the interior cells (no wrap, no
// bounds test) as SIMD blocks held in registers while the K terms stream
// past, then the few edge cells (wrap or zero). Weight rows are read once
// per block of rows and reused from cache for every (b, c). With B·C > 1 the
// (b, c) go in groups of 4 (8 for rows of one vector): each weight vector is
// loaded once per group and FMA'd into every channel's accumulators
// (row_dot_multi). Rows of at most one 64-byte vector run whole in registers
// on AVX-512, edges included, as lane permutations (short_row).
//
// Precision: fp16/bf16 are converted on load, every sum is fp32 (fp64 for
// fp64 inputs), results are cast back to the input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "../stencil.h"
#include "activations.h"
#include "dispatch.h"
#include "lattice.h"
#include "rows.h"

namespace cellkern {
namespace cpu {
namespace {

Lattice make_lattice(const at::Tensor& s, const at::Tensor& offsets, const c10::List<bool>& periodic) {
  TORCH_CHECK(s.dim() == 5, "cellkern_cpu: expected a [B, C, D, H, W] tensor, got ", s.sizes());
  return ::cellkern::cpu::make_lattice(s.size(0), s.size(1), s.size(2), s.size(3), s.size(4), offsets, periodic);
}

// Rows per task: enough work per task to amortise the scheduling.
int64_t row_grain(const Lattice& L) {
  const int64_t per_row = std::max<int64_t>(1, L.K * L.W * L.BC);
  return std::max<int64_t>(1, 32768 / per_row);
}

// ---- the three row passes ----
//
// Rows go in blocks: the weight rows of a block (K·R·W values, sized to stay
// in L2) are read from memory once and reused for every (b, c), while the
// state rows of one (b, c) are walked in order, so neighbouring output rows
// find their shared input rows in cache.

template <typename acc_t>
int64_t block_rows(const Lattice& L) {
  const int64_t per_row = std::max<int64_t>(1, L.K * L.W * int64_t(sizeof(acc_t)));
  return std::max<int64_t>(1, (192 << 10) / per_row);
}

// For every row and (b, c): acc = Σ_k m·w·s[nbr]; then epi(bc, row, acc).
// transposed = true gathers at -o_k instead, with the weight of the source
// cell: acc = Σ_k (m·w)[k, j-o_k]·s[j-o_k].
template <bool transposed, typename scalar_t, typename s_t, typename Epilogue>
void gather_pass(const Lattice& L, const s_t* p_s, const scalar_t* p_w, const bool* p_m, Epilogue epi) {
  using acc_t = acc_type<scalar_t>;
  const int64_t K = L.K, W = L.W, N = L.N;
  const int64_t R = block_rows<acc_t>(L);
  const int64_t sign = transposed ? -1 : 1;
  constexpr int kNB = 8;
#if defined(__AVX512F__)
  const bool short_rows = W * int64_t(sizeof(acc_t)) <= 64 && L.reach_x <= 7;
#else
  const bool short_rows = false;
#endif
  at::parallel_for(0, L.D * L.H, row_grain(L), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> wbuf(R * K * W), acc(W);
    std::vector<const acc_t*> wrow(R * K);
    std::vector<int64_t> nrow(R * K), nts(R);
    std::vector<Term<acc_t>> terms(R * K);
    std::vector<const acc_t*> pa(K), pb(kNB * K);
    std::vector<Term<acc_t>> mterms(kNB * K);
    std::vector<acc_t> macc(kNB * W);
    std::vector<RowSource<s_t>> srcs;
    for (int c = 0; c < kNB; ++c) srcs.emplace_back(p_s, N, W, K);
    RowSource<s_t>& src = srcs[0];
    // NB channels per pass over a row's terms: each weight vector is loaded
    // once for NB FMAs
    auto run_multi = [&](auto NBc, int64_t bc0, int64_t rb, int64_t re) {
      constexpr int NB = decltype(NBc)::value;
      for (int64_t row = rb; row < re; ++row) {
        const int64_t j = row - rb, nt = nts[j];
        for (int c = 0; c < NB; ++c) {
          srcs[c].clear();
          for (int64_t t = 0; t < nt; ++t) {
            Term<acc_t>& tm = mterms[c * nt + t];
            tm = terms[j * K + t];
            tm.a = wrow[j * K + t];
            tm.b = srcs[c].row(bc0 + c, nrow[j * K + t]);
          }
        }
        row_dot_multi<NB>(macc.data(), W, mterms.data(), nt, W, L.reach_x, L.px, pa.data(), pb.data());
        for (int c = 0; c < NB; ++c) epi(bc0 + c, row, macc.data() + c * W);
      }
    };
    for (int64_t rb = r0; rb < r1; rb += R) {
      const int64_t re = std::min(r1, rb + R);
      for (int64_t row = rb; row < re; ++row) {
        const int64_t z = row / L.H, y = row % L.H, j = row - rb;
        int64_t nt = 0;  // the offsets whose neighbour row exists
        for (int64_t k = 0; k < K; ++k) {
          const int64_t nr = nbr_row(z, y, sign * L.dz[k], sign * L.dy[k], L.D, L.H, L.pz, L.py);
          if (nr < 0) continue;
          const int64_t off = k * N + (transposed ? nr : row) * W;
          const int64_t t = j * K + nt++;
          wrow[t] = weight_row(p_w + off, p_m ? p_m + off : nullptr, W, wbuf.data() + t * W);
          nrow[t] = nr;
          terms[t] = {nullptr, nullptr, transposed ? -L.dx[k] : 0, sign * L.dx[k]};
        }
        nts[j] = nt;
      }
      int64_t bc = 0;
      if (L.BC > 1) {
        // rows in one register (short_row) take 8 channels at a time; longer
        // rows 4 (8 spills the accumulators and streams too many rows)
        if (short_rows) {
          for (; bc + 8 <= L.BC; bc += 8) run_multi(std::integral_constant<int, 8>{}, bc, rb, re);
        }
        for (; bc + 4 <= L.BC; bc += 4) run_multi(std::integral_constant<int, 4>{}, bc, rb, re);
        for (; bc + 2 <= L.BC; bc += 2) run_multi(std::integral_constant<int, 2>{}, bc, rb, re);
      }
      for (; bc < L.BC; ++bc) {
        for (int64_t row = rb; row < re; ++row) {
          const int64_t j = row - rb;
          Term<acc_t>* tj = terms.data() + j * K;
          src.clear();
          for (int64_t t = 0; t < nts[j]; ++t) {
            tj[t].a = wrow[j * K + t];
            tj[t].b = src.row(bc, nrow[j * K + t]);
          }
          if (!short_row<1>(acc.data(), W, tj, nts[j], W, L.reach_x, L.px)) {
            row_dot<false>(acc.data(), tj, nts[j], W, L.reach_x, L.px, pa.data(), pb.data());
          }
          epi(bc, row, acc.data());
        }
      }
    }
  });
}

// dw[k, row] = m · Σ_bc g[bc, row]·s[bc, nbr(row, k)], 0 where the neighbour does not exist.
template <typename g_t, typename scalar_t, typename out_t>
void weight_grad_pass(const Lattice& L, const g_t* p_g, const scalar_t* p_s, const bool* p_m, out_t* p_dw) {
  using acc_t = acc_type<scalar_t>;
  const int64_t K = L.K, W = L.W, N = L.N, BC = L.BC;
  const int64_t R = block_rows<acc_t>(L);
  at::parallel_for(0, L.D * L.H, row_grain(L), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> dwacc(R * K * W);
    std::vector<int64_t> nrow(R * K);
    Term<acc_t> term;
    const acc_t* pa[1];
    const acc_t* pb[1];
    RowSource<g_t> g_src(p_g, N, W, 1);
    RowSource<scalar_t> s_src(p_s, N, W, K);
    for (int64_t rb = r0; rb < r1; rb += R) {
      const int64_t re = std::min(r1, rb + R);
      for (int64_t row = rb; row < re; ++row) {
        const int64_t z = row / L.H, y = row % L.H;
        for (int64_t k = 0; k < K; ++k) {
          nrow[(row - rb) * K + k] = nbr_row(z, y, L.dz[k], L.dy[k], L.D, L.H, L.pz, L.py);
        }
      }
      for (int64_t bc = 0; bc < BC; ++bc) {
        for (int64_t row = rb; row < re; ++row) {
          g_src.clear();
          s_src.clear();
          const acc_t* p_gr = g_src.row(bc, row);
          for (int64_t k = 0; k < K; ++k) {
            const int64_t nr = nrow[(row - rb) * K + k];
            if (nr < 0) continue;
            term = {p_gr, s_src.row(bc, nr), 0, L.dx[k]};
            acc_t* p_acc = dwacc.data() + ((row - rb) * K + k) * W;
            if (bc == 0) {
              row_dot<false>(p_acc, &term, 1, W, L.reach_x, L.px, pa, pb);
            } else {
              row_dot<true>(p_acc, &term, 1, W, L.reach_x, L.px, pa, pb);
            }
          }
        }
      }
      for (int64_t row = rb; row < re; ++row) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t off = k * N + row * W;
          out_t* p_o = p_dw + off;
          const acc_t* p_a = dwacc.data() + ((row - rb) * K + k) * W;
          if (nrow[(row - rb) * K + k] < 0 || BC == 0) {
            std::fill(p_o, p_o + W, out_t(0));
          } else if (p_m != nullptr) {
            const bool* p_mr = p_m + off;
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) p_o[x] = static_cast<out_t>(p_mr[x] ? p_a[x] : acc_t(0));
          } else {
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) p_o[x] = static_cast<out_t>(p_a[x]);
          }
        }
      }
    }
  });
}

const bool* mask_ptr(const std::optional<at::Tensor>& mask) {
  return (mask.has_value() && mask->defined()) ? mask->data_ptr<bool>() : nullptr;
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }


// ---- the ops, per dtype ----

template <typename scalar_t, typename w_t>
void aggregate_forward_impl(const Lattice& L, const at::Tensor& s, const at::Tensor& w, const bool* p_m,
                            at::Tensor& a) {
  using acc_t = acc_type<scalar_t>;
  scalar_t* p_a = a.data_ptr<scalar_t>();
  const int64_t W = L.W, N = L.N;
  gather_pass<false, w_t, scalar_t>(L, s.data_ptr<scalar_t>(), w.data_ptr<w_t>(), p_m,
                        [&](int64_t bc, int64_t row, const acc_t* acc) {
                          scalar_t* p_o = p_a + bc * N + row * W;
#pragma omp simd
                          for (int64_t x = 0; x < W; ++x) p_o[x] = static_cast<scalar_t>(acc[x]);
                        });
}

template <typename scalar_t, typename w_t>
void aggregate_transposed_impl(const Lattice& L, const at::Tensor& g, const at::Tensor& w, const bool* p_m,
                               at::Tensor& ds) {
  using acc_t = acc_type<scalar_t>;
  scalar_t* p_ds = ds.data_ptr<scalar_t>();
  const int64_t W = L.W, N = L.N;
  gather_pass<true, w_t, scalar_t>(L, g.data_ptr<scalar_t>(), w.data_ptr<w_t>(), p_m,
                                      [&](int64_t bc, int64_t row, const acc_t* acc) {
                                        scalar_t* p_o = p_ds + bc * N + row * W;
#pragma omp simd
                                        for (int64_t x = 0; x < W; ++x) p_o[x] = static_cast<scalar_t>(acc[x]);
                                      });
}

// u = Σ_k m·w·s[nbr] + x + bias;  out = (1-α)·s + α·φ(u)
template <typename scalar_t, typename w_t, int64_t ACT>
void propagate_forward_impl(const Lattice& L, const scalar_t* p_s, const w_t* p_w, const bool* p_m,
                            const scalar_t* p_x, const scalar_t* p_bias, double leak, scalar_t* p_out,
                            acc_type<scalar_t>* p_u) {
  using acc_t = acc_type<scalar_t>;
  const acc_t alpha = static_cast<acc_t>(leak), keep = static_cast<acc_t>(1.0 - leak);
  const int64_t W = L.W, N = L.N, C = L.C;
  gather_pass<false, w_t, scalar_t>(L, p_s, p_w, p_m, [&](int64_t bc, int64_t row, acc_t* acc) {
    const int64_t base = bc * N + row * W;
    if (p_x != nullptr) {
      const scalar_t* p_xr = p_x + base;
#pragma omp simd
      for (int64_t i = 0; i < W; ++i) acc[i] += static_cast<acc_t>(p_xr[i]);
    }
    if (p_bias != nullptr) {
      const scalar_t* p_br = p_bias + (bc % C) * N + row * W;
#pragma omp simd
      for (int64_t i = 0; i < W; ++i) acc[i] += static_cast<acc_t>(p_br[i]);
    }
    if (p_u != nullptr) std::copy(acc, acc + W, p_u + base);
    const scalar_t* p_sr = p_s + base;
    scalar_t* p_o = p_out + base;
#pragma omp simd
    for (int64_t i = 0; i < W; ++i) {
      p_o[i] = static_cast<scalar_t>(keep * static_cast<acc_t>(p_sr[i]) + alpha * act_fn<ACT>(acc[i]));
    }
  });
}

// du = g·α·φ'(u);  ds = (1-α)·g + Σ_k m·w·du at -o_k;  dw = m·Σ_{b,c} du·s[nbr]
template <typename scalar_t, typename w_t, int64_t ACT>
void propagate_backward_impl(const Lattice& L, const scalar_t* p_g, const scalar_t* p_s, const w_t* p_w,
                             const bool* p_m, const acc_type<scalar_t>* p_u, double leak,
                             acc_type<scalar_t>* p_du, scalar_t* p_ds, w_t* p_dw) {
  using acc_t = acc_type<scalar_t>;
  const acc_t alpha = static_cast<acc_t>(leak), keep = static_cast<acc_t>(1.0 - leak);
  const int64_t W = L.W, N = L.N;
  at::parallel_for(0, L.BC * N, 32768, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) p_du[i] = static_cast<acc_t>(p_g[i]) * alpha * act_grad<ACT>(p_u[i]);
  });
  if (p_ds != nullptr) {
    gather_pass<true, w_t, acc_t>(L, p_du, p_w, p_m, [&](int64_t bc, int64_t row, const acc_t* acc) {
      const int64_t base = bc * N + row * W;
      const scalar_t* p_gr = p_g + base;
      scalar_t* p_o = p_ds + base;
#pragma omp simd
      for (int64_t i = 0; i < W; ++i) p_o[i] = static_cast<scalar_t>(keep * static_cast<acc_t>(p_gr[i]) + acc[i]);
    });
  }
  if (p_dw != nullptr) weight_grad_pass<acc_t, scalar_t, w_t>(L, p_du, p_s, p_m, p_dw);
}

}  // namespace

// A fresh output tensor. Very large ones ask Linux for transparent huge
// pages (2 MiB) before the first touch: writing a new 218 MB weight gradient
// (128³, moore) then takes ~100 page faults instead of ~53 000, 7 ms instead
// of 50 ms. Only above glibc's largest mmap threshold (32 MiB): smaller
// buffers are recycled by malloc without faults, and huge pages there cost
// more than they save. Elsewhere (or with THP off) this is a plain at::empty.
std::atomic<bool> g_poison{false};

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (g_poison.load(std::memory_order_relaxed)) return t.fill_(std::numeric_limits<double>::quiet_NaN());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + t.nbytes()) & ~(kHuge - 1);
  if (t.nbytes() >= (size_t(64) << 20) && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

// Test aid: NaN-fill every output at allocation, so an element a kernel
// forgets to write fails the comparison with the reference.
void set_poison(bool on) { g_poison.store(on); }

// The kernels' allocation helper itself, so a test can see the poisoning.
at::Tensor new_output(c10::IntArrayRef size, c10::ScalarType dtype) { return empty_output(size, at::TensorOptions().dtype(dtype)); }

at::Tensor aggregate_forward(const at::Tensor& s, const at::Tensor& w, const std::optional<at::Tensor>& mask,
                             const at::Tensor& offsets, c10::List<bool> periodic) {
  const Lattice L = make_lattice(s, offsets, periodic);
  at::Tensor a = empty_output(s.sizes(), s.options());
  dispatch_state_weights<false>(s.scalar_type(), w.scalar_type(), [&](auto s0, auto w0) {
    aggregate_forward_impl<decltype(s0), decltype(w0)>(L, s, w, mask_ptr(mask), a);
  });
  return a;
}

at::Tensor aggregate_transposed(const at::Tensor& g, const at::Tensor& w, const std::optional<at::Tensor>& mask,
                                const at::Tensor& offsets, c10::List<bool> periodic) {
  const Lattice L = make_lattice(g, offsets, periodic);
  at::Tensor ds = empty_output(g.sizes(), g.options());
  dispatch_state_weights<false>(g.scalar_type(), w.scalar_type(), [&](auto s0, auto w0) {
    aggregate_transposed_impl<decltype(s0), decltype(w0)>(L, g, w, mask_ptr(mask), ds);
  });
  return ds;
}

at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& s, const std::optional<at::Tensor>& mask,
                       const at::Tensor& offsets, c10::List<bool> periodic) {
  const Lattice L = make_lattice(s, offsets, periodic);
  at::Tensor dw = empty_output({L.K, L.D, L.H, L.W}, s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "weight_grad", [&] {
    weight_grad_pass<scalar_t, scalar_t, scalar_t>(L, g.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                                                   mask_ptr(mask), dw.data_ptr<scalar_t>());
  });
  return dw;
}

std::tuple<at::Tensor, at::Tensor> propagate_forward(const at::Tensor& s, const at::Tensor& w,
                                                     const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& x,
                                                     const std::optional<at::Tensor>& bias,
                                                     const at::Tensor& offsets, c10::List<bool> periodic,
                                                     double leak, int64_t act, bool save_u) {
  const Lattice L = make_lattice(s, offsets, periodic);
  const auto u_opts = s.options().dtype(acc_scalar_type(s.scalar_type()));
  at::Tensor out = empty_output(s.sizes(), s.options());
  at::Tensor u = save_u ? empty_output(s.sizes(), u_opts) : at::empty({0}, u_opts);
  dispatch_state_weights<false>(s.scalar_type(), w.scalar_type(), [&](auto s0, auto w0) {
    using scalar_t = decltype(s0);
    using w_t = decltype(w0);
    using acc_t = acc_type<scalar_t>;
    acc_t* p_u = save_u ? u.data_ptr<acc_t>() : nullptr;
    dispatch_act(act, [&](auto ACT) {
      propagate_forward_impl<scalar_t, w_t, decltype(ACT)::value>(
          L, s.data_ptr<scalar_t>(), w.data_ptr<w_t>(), mask_ptr(mask), opt_ptr<scalar_t>(x),
          opt_ptr<scalar_t>(bias), leak, out.data_ptr<scalar_t>(), p_u);
    });
  });
  return {out, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_backward(
    const at::Tensor& g, const at::Tensor& s, const at::Tensor& w, const std::optional<at::Tensor>& mask,
    const at::Tensor& u, const at::Tensor& offsets, c10::List<bool> periodic, double leak, int64_t act,
    bool need_s, bool need_w) {
  const Lattice L = make_lattice(s, offsets, periodic);
  TORCH_CHECK(u.scalar_type() == acc_scalar_type(s.scalar_type()), "cellkern_cpu: u must be ",
              acc_scalar_type(s.scalar_type()), " for ", s.scalar_type(), " inputs, got ", u.scalar_type());
  at::Tensor du = empty_output(s.sizes(), u.options());
  at::Tensor ds = need_s ? empty_output(s.sizes(), s.options()) : at::empty({0}, s.options());
  at::Tensor dw = need_w ? empty_output(w.sizes(), w.options()) : at::empty({0}, w.options());
  dispatch_state_weights<false>(s.scalar_type(), w.scalar_type(), [&](auto s0, auto w0) {
    using scalar_t = decltype(s0);
    using w_t = decltype(w0);
    using acc_t = acc_type<scalar_t>;
    dispatch_act(act, [&](auto ACT) {
      propagate_backward_impl<scalar_t, w_t, decltype(ACT)::value>(
          L, g.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), w.data_ptr<w_t>(), mask_ptr(mask),
          u.data_ptr<acc_t>(), leak, du.data_ptr<acc_t>(), need_s ? ds.data_ptr<scalar_t>() : nullptr,
          need_w ? dw.data_ptr<w_t>() : nullptr);
    });
  });
  return {ds, dw, du};
}

}  // namespace cpu
}  // namespace cellkern
