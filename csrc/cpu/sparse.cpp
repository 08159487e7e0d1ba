// Fused CPU kernels of the propagation family on the ELL form (SPEC §5).
//
//   aggregate   a[b,c,i] = Σ_j w_ell[j,i]·s[b,c,nbr(i, idx[j,i])]     (idx = 255: empty slot)
//   propagate   s'       = (1-α)·s + α·φ(aggregate + x + bias)
//
// The weight loop runs over the Kmax slots, not the K offsets. Parallel over
// lattice rows (z, y); per row, once for all (b, c): every slot's weight in
// the accumulation type and the in-plane index of its presynaptic cell
// (offset from idx, wrap or zero boundary resolved; an empty slot or a
// neighbour outside a zero boundary gets weight 0 and a valid dummy index,
// so the inner loop has no branch). Then per (b, c) the sum is Kmax
// branch-free gather-FMA sweeps along the row, which -march=native turns into
// SIMD gathers. At keep = 0.3 of the Moore stencil this reads 8 weights and 8
// indices per cell instead of 26 weights (and 26 mask bytes).
//
// Weights may have a lower precision than the state (fp16/bf16 w with fp32
// s): every sum is in the accumulation type of s (fp32, fp64 for fp64 s), the
// output has the dtype of s.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <optional>
#include <tuple>
#include <vector>

#include "../stencil.h"
#include "activations.h"
#include "dispatch.h"
#include "lattice.h"
#include "rows.h"

namespace cellkern {
namespace cpu {
namespace {

constexpr int64_t kEmpty = 255;

// A weight in the accumulation type; bf16 by its bits (a shift the
// vectoriser sees through, where the c10 conversion stays scalar).
template <typename acc_t, typename w_t>
inline acc_t load_weight(const w_t* p) {
  if constexpr (std::is_same_v<w_t, c10::BFloat16>) {
    uint16_t bits;
    std::memcpy(&bits, p, 2);
    const uint32_t f = uint32_t(bits) << 16;
    float v;
    std::memcpy(&v, &f, 4);
    return static_cast<acc_t>(v);
  } else {
    return static_cast<acc_t>(*p);
  }
}

constexpr int32_t kBad = std::numeric_limits<int32_t>::min();

// For every row and (b, c): acc = Σ_j w_ell[j]·s[bc, nbr(row, idx[j])]; then epi(bc, row, acc).
template <typename s_t, typename w_t, typename Epilogue>
void ell_pass(const Lattice& L, const s_t* p_s, const w_t* p_w, const uint8_t* p_idx, int64_t Kmax, Epilogue epi) {
  using acc_t = acc_type<s_t>;
  const int64_t K = L.K, W = L.W, N = L.N;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Kmax * W * L.BC));
  // cells [xl, xh) of a row see every offset's neighbour without wrapping
  const int64_t xl = std::min(W, L.reach_x), xh = std::max(xl, W - L.reach_x);
  // the interleaved state of the B·C ≥ 2 path: [ceil(BC/4), N, 4], zero-padded
  const float* p_s4 = nullptr;
  at::Tensor s4;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<s_t, float>) {
    if (L.BC >= 2) {
      const int64_t G = (L.BC + 3) / 4;
      s4 = at::empty({G * N * 4}, at::TensorOptions().dtype(at::kFloat));  // no zero fill: every element is written
      float* p_d0 = s4.data_ptr<float>();
      at::parallel_for(0, N, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t g = 0; g < G; ++g) {
          float* p_d = p_d0 + g * N * 4;
          const float* p_c[4];
          for (int c = 0; c < 4; ++c) p_c[c] = g * 4 + c < L.BC ? p_s + (g * 4 + c) * N : nullptr;
          for (int64_t i = i0; i < i1; ++i) {
            for (int c = 0; c < 4; ++c) p_d[i * 4 + c] = p_c[c] != nullptr ? p_c[c][i] : 0.0f;
          }
        }
      });
      p_s4 = p_d0;
    }
  }
#endif
  at::parallel_for(0, L.D * L.H, grain, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> base(K);
    std::vector<int32_t> table(256, kBad);  // in-plane index of cell 0's neighbour per offset, kBad: none
    std::vector<int32_t> off(Kmax * W);
    std::vector<acc_t> wv(Kmax * W), acc(W), macc(8 * W);
    const int32_t* p_t = table.data();
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t z = row / L.H, y = row % L.H;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t nr = nbr_row(z, y, L.dz[k], L.dy[k], L.D, L.H, L.pz, L.py);
        base[k] = nr < 0 ? -1 : nr * W;
        table[k] = nr < 0 ? kBad : static_cast<int32_t>(nr * W + L.dx[k]);
      }
      for (int64_t j = 0; j < Kmax; ++j) {
        const uint8_t* p_ir = p_idx + j * N + row * W;
        const w_t* p_wr = p_w + j * N + row * W;
        int32_t* p_o = off.data() + j * W;
        acc_t* p_v = wv.data() + j * W;
        int64_t x0 = xl;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        // 16 cells per step: the table lookup as one two-register permute
        // (idx & 31; empty 255 → entry 31, which is kBad since K ≤ 31)
        if constexpr (std::is_same_v<acc_t, float> &&
                      (std::is_same_v<w_t, float> || std::is_same_v<w_t, c10::BFloat16>)) {
          if (K <= 31) {
            const __m512i t_lo = _mm512_loadu_si512(p_t), t_hi = _mm512_loadu_si512(p_t + 16);
            const __m512i bad = _mm512_set1_epi32(kBad);
            const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            for (; x0 + 16 <= xh; x0 += 16) {
              const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p_ir + x0)));
              const __m512i tk = _mm512_permutex2var_epi32(t_lo, k, t_hi);
              const __mmask16 ok = _mm512_cmpneq_epi32_mask(tk, bad);
              const __m512i xs = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(x0)));
              _mm512_storeu_si512(p_o + x0, _mm512_maskz_add_epi32(ok, tk, xs));
              __m512 v;
              if constexpr (std::is_same_v<w_t, float>) {
                v = _mm512_maskz_loadu_ps(ok, reinterpret_cast<const float*>(p_wr + x0));
              } else {
                const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p_wr + x0)));
                v = _mm512_maskz_mov_ps(ok, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
              }
              _mm512_storeu_ps(reinterpret_cast<float*>(p_v + x0), v);
            }
          }
        }
#endif
#pragma omp simd
        for (int64_t x = x0; x < xh; ++x) {
          const int32_t tk = p_t[p_ir[x]];
          const bool ok = tk != kBad;
          p_o[x] = ok ? tk + static_cast<int32_t>(x) : 0;
          p_v[x] = ok ? load_weight<acc_t>(p_wr + x) : acc_t(0);
        }
        auto edge = [&](int64_t x0, int64_t x1) {
          for (int64_t x = x0; x < x1; ++x) {
            const int64_t k = p_ir[x];
            int64_t o = -1;
            if (k < K && base[k] >= 0) {
              const int64_t xx = axis_nbr(x, L.dx[k], W, L.px);
              if (xx >= 0) o = base[k] + xx;
            }
            p_o[x] = static_cast<int32_t>(o < 0 ? 0 : o);
            p_v[x] = o < 0 ? acc_t(0) : load_weight<acc_t>(p_wr + x);
          }
        };
        edge(0, xl);
        edge(xh, W);
      }
      int64_t bc_done = 0;
#if defined(__AVX512F__)
      // B·C ≥ 2: the state, interleaved in groups of 4 (b, c), gives a cell's
      // 4 values in one 16-byte load: one load + FMA per cell and slot
      // instead of 4 gathers
      if constexpr (std::is_same_v<s_t, float>) {
       if (p_s4 != nullptr) {
        for (int64_t g = 0; g * 4 < L.BC; ++g) {
          const float* p_sg = p_s4 + g * N * 4;
          float* p_t4 = macc.data() + 4 * W;
          int64_t x = 0;
          // 4 cells at a time: 4 independent FMA chains hide the FMA latency
          for (; x + 4 <= W; x += 4) {
            __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t j = 0; j < Kmax; ++j) {
              const int32_t* p_o = off.data() + j * W + x;
              const float* p_v = reinterpret_cast<const float*>(wv.data()) + j * W + x;
              a0 = _mm_fmadd_ps(_mm_set1_ps(p_v[0]), _mm_loadu_ps(p_sg + int64_t(p_o[0]) * 4), a0);
              a1 = _mm_fmadd_ps(_mm_set1_ps(p_v[1]), _mm_loadu_ps(p_sg + int64_t(p_o[1]) * 4), a1);
              a2 = _mm_fmadd_ps(_mm_set1_ps(p_v[2]), _mm_loadu_ps(p_sg + int64_t(p_o[2]) * 4), a2);
              a3 = _mm_fmadd_ps(_mm_set1_ps(p_v[3]), _mm_loadu_ps(p_sg + int64_t(p_o[3]) * 4), a3);
            }
            _mm_storeu_ps(p_t4 + x * 4, a0);
            _mm_storeu_ps(p_t4 + x * 4 + 4, a1);
            _mm_storeu_ps(p_t4 + x * 4 + 8, a2);
            _mm_storeu_ps(p_t4 + x * 4 + 12, a3);
          }
          for (; x < W; ++x) {
            __m128 a = _mm_setzero_ps();
            for (int64_t j = 0; j < Kmax; ++j) {
              const int64_t o = off[j * W + x];
              a = _mm_fmadd_ps(_mm_set1_ps(static_cast<float>(wv[j * W + x])), _mm_loadu_ps(p_sg + o * 4), a);
            }
            _mm_storeu_ps(p_t4 + x * 4, a);
          }
          const int nb = static_cast<int>(std::min<int64_t>(4, L.BC - g * 4));
          for (int c = 0; c < nb; ++c) {
            float* p_c = macc.data() + c * W;
            for (int64_t x = 0; x < W; ++x) p_c[x] = p_t4[x * 4 + c];
            epi(g * 4 + c, row, p_c);
          }
        }
        bc_done = L.BC;
       }
      }
      // per 16 cells: the sums of 4 (b, c) stay in registers across the
      // Kmax slots; each slot's index and weight vectors are loaded once for the 4
      if constexpr (std::is_same_v<s_t, float>) {
        for (; bc_done < L.BC; bc_done += 4) {
          const int nb = static_cast<int>(std::min<int64_t>(4, L.BC - bc_done));
          const float* p_sc[4];
          for (int c = 0; c < 4; ++c) p_sc[c] = p_s + (bc_done + std::min(c, nb - 1)) * N;
          for (int64_t x = 0; x < W; x += 16) {
            const __mmask16 m = W - x >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (W - x)) - 1u);
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t j = 0; j < Kmax; ++j) {
              const __m512i o = _mm512_maskz_loadu_epi32(m, off.data() + j * W + x);
              const __m512 v = _mm512_maskz_loadu_ps(m, wv.data() + j * W + x);
              a0 = _mm512_fmadd_ps(v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, o, p_sc[0], 4), a0);
              if (nb > 1) a1 = _mm512_fmadd_ps(v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, o, p_sc[1], 4), a1);
              if (nb > 2) a2 = _mm512_fmadd_ps(v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, o, p_sc[2], 4), a2);
              if (nb > 3) a3 = _mm512_fmadd_ps(v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, o, p_sc[3], 4), a3);
            }
            _mm512_mask_storeu_ps(macc.data() + x, m, a0);
            _mm512_mask_storeu_ps(macc.data() + W + x, m, a1);
            _mm512_mask_storeu_ps(macc.data() + 2 * W + x, m, a2);
            _mm512_mask_storeu_ps(macc.data() + 3 * W + x, m, a3);
          }
          for (int c = 0; c < nb; ++c) epi(bc_done + c, row, macc.data() + c * W);
        }
      }
#endif
      for (int64_t bc = bc_done; bc < L.BC; ++bc) {
        const s_t* p_sb = p_s + bc * N;
        acc_t* p_a = acc.data();
        {
          const int32_t* p_o = off.data();
          const acc_t* p_v = wv.data();
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) p_a[x] = p_v[x] * static_cast<acc_t>(p_sb[p_o[x]]);
        }
        for (int64_t j = 1; j < Kmax; ++j) {
          const int32_t* p_o = off.data() + j * W;
          const acc_t* p_v = wv.data() + j * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) p_a[x] += p_v[x] * static_cast<acc_t>(p_sb[p_o[x]]);
        }
        epi(bc, row, p_a);
      }
    }
  });
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

Lattice ell_lattice(const at::Tensor& s, const at::Tensor& w_ell, const at::Tensor& idx, const at::Tensor& offsets,
                    const c10::List<bool>& periodic) {
  TORCH_CHECK(s.dim() == 5, "cellkern_cpu: expected a [B, C, D, H, W] state, got ", s.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kByte, "cellkern_cpu: idx must be uint8, got ", idx.scalar_type());
  TORCH_CHECK(w_ell.sizes() == idx.sizes() && w_ell.dim() == 4, "cellkern_cpu: w_ell and idx must be "
              "[Kmax, D, H, W] of one shape, got ", w_ell.sizes(), " and ", idx.sizes());
  const int64_t N = s.size(2) * s.size(3) * s.size(4);
  TORCH_CHECK(N < (int64_t(1) << 31), "cellkern_cpu: the ELL kernels index a lattice plane in int32, got N = ", N);
  return make_lattice(s.size(0), s.size(1), s.size(2), s.size(3), s.size(4), offsets, periodic);
}

}  // namespace

at::Tensor aggregate_forward_ell(const at::Tensor& s, const at::Tensor& w_ell, const at::Tensor& idx,
                                 const at::Tensor& offsets, c10::List<bool> periodic) {
  const Lattice L = ell_lattice(s, w_ell, idx, offsets, periodic);
  at::Tensor a = empty_output(s.sizes(), s.options());
  dispatch_state_weights<true>(s.scalar_type(), w_ell.scalar_type(), [&](auto s0, auto w0) {
    using s_t = decltype(s0);
    using w_t = decltype(w0);
    using acc_t = acc_type<s_t>;
    s_t* p_a = a.data_ptr<s_t>();
    ell_pass(L, s.data_ptr<s_t>(), w_ell.data_ptr<w_t>(), idx.data_ptr<uint8_t>(), w_ell.size(0),
             [&](int64_t bc, int64_t row, const acc_t* acc) {
               s_t* p_o = p_a + bc * L.N + row * L.W;
#pragma omp simd
               for (int64_t x = 0; x < L.W; ++x) p_o[x] = static_cast<s_t>(acc[x]);
             });
  });
  return a;
}

// u = Σ_j w_ell·s[nbr] + x + bias;  out = (1-α)·s + α·φ(u)
std::tuple<at::Tensor, at::Tensor> propagate_forward_ell(const at::Tensor& s, const at::Tensor& w_ell,
                                                         const at::Tensor& idx, const std::optional<at::Tensor>& x,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& offsets, c10::List<bool> periodic,
                                                         double leak, int64_t act, bool save_u) {
  const Lattice L = ell_lattice(s, w_ell, idx, offsets, periodic);
  const auto u_opts = s.options().dtype(s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor out = empty_output(s.sizes(), s.options());
  at::Tensor u = save_u ? empty_output(s.sizes(), u_opts) : at::empty({0}, u_opts);
  dispatch_state_weights<true>(s.scalar_type(), w_ell.scalar_type(), [&](auto s0, auto w0) {
    using s_t = decltype(s0);
    using w_t = decltype(w0);
    using acc_t = acc_type<s_t>;
    const acc_t alpha = static_cast<acc_t>(leak), keep = static_cast<acc_t>(1.0 - leak);
    const s_t* p_s = s.data_ptr<s_t>();
    const s_t* p_x = opt_ptr<s_t>(x);
    const s_t* p_bias = opt_ptr<s_t>(bias);
    s_t* p_out = out.data_ptr<s_t>();
    acc_t* p_u = save_u ? u.data_ptr<acc_t>() : nullptr;
    const int64_t W = L.W, N = L.N, C = L.C;
    dispatch_act(act, [&](auto ACT) {
      constexpr int64_t A = decltype(ACT)::value;
      ell_pass(L, p_s, w_ell.data_ptr<w_t>(), idx.data_ptr<uint8_t>(), w_ell.size(0),
               [&](int64_t bc, int64_t row, acc_t* acc) {
                 const int64_t b0 = bc * N + row * W;
                 if (p_x != nullptr) {
#pragma omp simd
                   for (int64_t i = 0; i < W; ++i) acc[i] += static_cast<acc_t>(p_x[b0 + i]);
                 }
                 if (p_bias != nullptr) {
                   const s_t* p_br = p_bias + (bc % C) * N + row * W;
#pragma omp simd
                   for (int64_t i = 0; i < W; ++i) acc[i] += static_cast<acc_t>(p_br[i]);
                 }
                 if (p_u != nullptr) std::copy(acc, acc + W, p_u + b0);
#pragma omp simd
                 for (int64_t i = 0; i < W; ++i) {
                   p_out[b0 + i] = static_cast<s_t>(keep * static_cast<acc_t>(p_s[b0 + i]) + alpha * act_fn<A>(acc[i]));
                 }
               });
    });
  });
  return {out, u};
}

}  // namespace cpu
}  // namespace cellkern

namespace cellkern {
namespace cpu {

// The dense masked form of an ELL pair: w[k, i] = w_ell[j, i] and mask[k, i]
// where idx[j, i] = k; 0 and False elsewhere. Parallel over cells.
std::tuple<at::Tensor, at::Tensor> ell_expand(const at::Tensor& w_ell, const at::Tensor& idx, int64_t K) {
  TORCH_CHECK(idx.scalar_type() == at::kByte && w_ell.sizes() == idx.sizes() && w_ell.dim() == 4,
              "cellkern_cpu: ell_expand takes w_ell and uint8 idx of one [Kmax, D, H, W] shape");
  const int64_t Kmax = w_ell.size(0), N = w_ell.numel() / std::max<int64_t>(1, Kmax);
  // huge pages for large outputs (empty_output): the first touch of a fresh
  // 200 MB dense copy would otherwise fault page by page
  at::Tensor w = empty_output({K, w_ell.size(1), w_ell.size(2), w_ell.size(3)}, w_ell.options());
  at::Tensor mask = at::empty(w.sizes(), w_ell.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_ell.scalar_type(), "ell_expand", [&] {
    const scalar_t* p_we = w_ell.data_ptr<scalar_t>();
    const uint8_t* p_i = idx.data_ptr<uint8_t>();
    scalar_t* p_w = w.data_ptr<scalar_t>();
    bool* p_m = mask.data_ptr<bool>();
    at::parallel_for(0, N, 8192, [&](int64_t i0, int64_t i1) {
      for (int64_t k = 0; k < K; ++k) {
        std::fill(p_w + k * N + i0, p_w + k * N + i1, scalar_t(0));
        std::fill(p_m + k * N + i0, p_m + k * N + i1, false);
      }
      for (int64_t j = 0; j < Kmax; ++j) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t k = p_i[j * N + i];
          if (k < K) {
            p_w[k * N + i] = p_we[j * N + i];
            p_m[k * N + i] = true;
          }
        }
      }
    });
  });
  return {w, mask};
}

// w_ell[j, i] = dense[idx[j, i], i] (0 in empty slots), in place.
void ell_gather_(at::Tensor& w_ell, const at::Tensor& idx, const at::Tensor& dense) {
  TORCH_CHECK(idx.scalar_type() == at::kByte && w_ell.sizes() == idx.sizes() && w_ell.is_contiguous() &&
                  dense.is_contiguous() && dense.scalar_type() == w_ell.scalar_type(),
              "cellkern_cpu: ell_gather_ takes a contiguous w_ell, its uint8 idx and a dense tensor of its dtype");
  const int64_t Kmax = w_ell.size(0), N = w_ell.numel() / std::max<int64_t>(1, Kmax), K = dense.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_ell.scalar_type(), "ell_gather_", [&] {
    scalar_t* p_we = w_ell.data_ptr<scalar_t>();
    const uint8_t* p_i = idx.data_ptr<uint8_t>();
    const scalar_t* p_d = dense.data_ptr<scalar_t>();
    at::parallel_for(0, N, 8192, [&](int64_t i0, int64_t i1) {
      for (int64_t j = 0; j < Kmax; ++j) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t k = p_i[j * N + i];
          p_we[j * N + i] = k < K ? p_d[k * N + i] : scalar_t(0);
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace cellkern
