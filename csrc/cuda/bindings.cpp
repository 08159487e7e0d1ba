// The torch glue of the CUDA kernels: the schemas of torch.ops.cellkern_cuda
// (those of cellkern_cpu plus the CUDA stream, an int64 cudaStream_t that
// cellkern/backends/cuda.py takes from torch.cuda.current_stream) and their
// CUDA implementations. Checks, allocation and dtype conversion happen here;
// the launchers (kernels.h) take raw pointers. No CUDA headers: this file
// compiles against any torch, and the module cellkern._C_cuda links the
// nvcc-compiled kernels and libcudart.
#include <torch/extension.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../plasticity.h"
#include "kernels.h"

// CELLKERN_CUDA_EMULATION: the same glue over the kernels compiled as host
// code, for CPU tensors, as torch.ops.cellkern_cuda_emu (the CPU test of
// python_tests/test_cuda_emulation.py).
#if defined(CELLKERN_CUDA_EMULATION)
#define CK_CUDA_LIBRARY cellkern_cuda_emu
#define CK_CUDA_KEY CPU
constexpr bool kEmulated = true;
#else
#define CK_CUDA_LIBRARY cellkern_cuda
#define CK_CUDA_KEY CUDA
constexpr bool kEmulated = false;
#endif
// one level of indirection, so that the macros above expand before TORCH_LIBRARY pastes them
#define CK_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define CK_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace cellkern {
namespace cuda {
namespace glue {

std::atomic<bool> g_poison{false};

// Test aid: NaN-fill every output at allocation (backends.poison_outputs).
void set_poison(bool on) { g_poison.store(on); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (g_poison.load(std::memory_order_relaxed)) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// The kernels' allocation helper itself, so a test can see the poisoning.
at::Tensor new_output(c10::IntArrayRef size, c10::ScalarType dtype, c10::Device device) {
  return empty_output(size, at::TensorOptions().dtype(dtype).device(device));
}

void check(const char* err, const char* op) { TORCH_CHECK(err == nullptr, "cellkern_cuda.", op, ": ", err); }

void* stream_of(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kDouble: return Dtype::kFloat64;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK(false, "cellkern_cuda: expected a float16/bfloat16/float32/float64 tensor, got ", t.scalar_type());
  }
  return Dtype::kFloat32;
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK((t.is_cuda() || kEmulated) && t.device() == like.device(), "cellkern_cuda: ", name, " must be on ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "cellkern_cuda: ", name, " must be contiguous");
}

at::Tensor opt(const std::optional<at::Tensor>& t) { return (t.has_value() && t->defined()) ? *t : at::Tensor(); }

const void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

const uint8_t* byte_ptr(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  const at::Tensor m = opt(t);
  if (!m.defined()) return nullptr;
  check_cuda(m, name, like);
  TORCH_CHECK(m.scalar_type() == at::kBool, "cellkern_cuda: ", name, " must be bool, got ", m.scalar_type());
  return reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
}

// The tensor in the accumulation type (itself when it already is).
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  return (!t.defined() || t.scalar_type() == acc) ? t : t.to(acc);
}

Lattice make_lattice(int64_t BC, int64_t C, int64_t D, int64_t H, int64_t W, const at::Tensor& offsets,
                     const c10::List<bool>& periodic, const at::Tensor& like) {
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(1) == 3 && offsets.scalar_type() == at::kInt,
              "cellkern_cuda: offsets must be an int32 [K, 3] tensor, got ", offsets.scalar_type(), " ",
              offsets.sizes());
  check_cuda(offsets, "offsets", like);
  TORCH_CHECK(periodic.size() == 3, "cellkern_cuda: periodic must have 3 entries, got ", periodic.size());
  TORCH_CHECK(D * H * W < (int64_t(1) << 31), "cellkern_cuda: lattices of 2^31 cells or more are not supported, got ",
              D, "x", H, "x", W);
  TORCH_CHECK(W <= int64_t(65535) * 128, "cellkern_cuda: W must be at most ", int64_t(65535) * 128, ", got ", W);
  TORCH_CHECK(offsets.size(0) <= 3072, "cellkern_cuda: stencils of at most 3072 offsets (the table lives in 48 KiB "
              "of shared memory), got ", offsets.size(0));
  Lattice L;
  L.BC = BC;
  L.C = C;
  L.D = int(D);
  L.H = int(H);
  L.W = int(W);
  L.K = int(offsets.size(0));
  L.pz = periodic.get(0);
  L.py = periodic.get(1);
  L.px = periodic.get(2);
  L.offsets = offsets.data_ptr<int32_t>();
  return L;
}

Lattice state_lattice(const at::Tensor& s, const at::Tensor& offsets, const c10::List<bool>& periodic) {
  TORCH_CHECK(s.dim() == 5, "cellkern_cuda: expected a [B, C, D, H, W] tensor, got ", s.sizes());
  check_cuda(s, "s", s);
  return make_lattice(s.size(0) * s.size(1), s.size(1), s.size(2), s.size(3), s.size(4), offsets, periodic, s);
}

// ---- propagation ----

at::Tensor aggregate_forward(const at::Tensor& s, const at::Tensor& w, const std::optional<at::Tensor>& mask,
                             const at::Tensor& offsets, c10::List<bool> periodic, int64_t stream) {
  const Lattice L = state_lattice(s, offsets, periodic);
  check_cuda(w, "w", s);
  at::Tensor a = empty_output(s.sizes(), s.options());
  check(cuda::gather_forward(L, dtype_of(s), s.data_ptr(), w.data_ptr(), byte_ptr(mask, s, "mask"), nullptr, nullptr,
                       false, 1.0, 0, a.data_ptr(), nullptr, stream_of(stream)),
        "aggregate_forward");
  return a;
}

at::Tensor aggregate_transposed(const at::Tensor& g, const at::Tensor& w, const std::optional<at::Tensor>& mask,
                                const at::Tensor& offsets, c10::List<bool> periodic, int64_t stream) {
  const Lattice L = state_lattice(g, offsets, periodic);
  check_cuda(w, "w", g);
  const at::Tensor ga = as_acc(g, acc_of(g.scalar_type()));  // the kernel reads the gradient in fp32 (fp64)
  at::Tensor ds = empty_output(g.sizes(), g.options());
  check(cuda::gather_transposed(L, dtype_of(g), ga.data_ptr(), w.data_ptr(), byte_ptr(mask, g, "mask"), nullptr, 0.0,
                          ds.data_ptr(), stream_of(stream)),
        "aggregate_transposed");
  return ds;
}

at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& s, const std::optional<at::Tensor>& mask,
                       const at::Tensor& offsets, c10::List<bool> periodic, int64_t stream) {
  const Lattice L = state_lattice(s, offsets, periodic);
  check_cuda(g, "g", s);
  at::Tensor dw = empty_output({L.K, L.D, L.H, L.W}, s.options());
  check(cuda::weight_grad(L, dtype_of(s), g.data_ptr(), nullptr, 1.0, 0, s.data_ptr(), byte_ptr(mask, s, "mask"),
                    dw.data_ptr(), nullptr, stream_of(stream)),
        "weight_grad");
  return dw;
}

std::tuple<at::Tensor, at::Tensor> propagate_forward(const at::Tensor& s, const at::Tensor& w,
                                                     const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& x,
                                                     const std::optional<at::Tensor>& bias,
                                                     const at::Tensor& offsets, c10::List<bool> periodic,
                                                     double leak, int64_t act, bool save_u, int64_t stream) {
  const Lattice L = state_lattice(s, offsets, periodic);
  check_cuda(w, "w", s);
  TORCH_CHECK(act >= 0 && act <= kSigmoid, "cellkern_cuda: act must be 0..", int64_t(kSigmoid), ", got ", act);
  const at::Tensor tx = opt(x), tb = opt(bias);
  if (tx.defined()) check_cuda(tx, "x", s);
  if (tb.defined()) check_cuda(tb, "bias", s);
  const auto u_opts = s.options().dtype(acc_of(s.scalar_type()));
  at::Tensor out = empty_output(s.sizes(), s.options());
  at::Tensor u = save_u ? empty_output(s.sizes(), u_opts) : at::empty({0}, u_opts);
  check(cuda::gather_forward(L, dtype_of(s), s.data_ptr(), w.data_ptr(), byte_ptr(mask, s, "mask"), ptr(tx), ptr(tb),
                       true, leak, int(act), out.data_ptr(), save_u ? u.data_ptr() : nullptr, stream_of(stream)),
        "propagate_forward");
  return {out, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_backward(
    const at::Tensor& g, const at::Tensor& s, const at::Tensor& w, const std::optional<at::Tensor>& mask,
    const at::Tensor& u, const at::Tensor& offsets, c10::List<bool> periodic, double leak, int64_t act, bool need_s,
    bool need_w, int64_t stream) {
  const Lattice L = state_lattice(s, offsets, periodic);
  check_cuda(g, "g", s);
  check_cuda(w, "w", s);
  check_cuda(u, "u", s);
  TORCH_CHECK(act >= 0 && act <= kSigmoid, "cellkern_cuda: act must be 0..", int64_t(kSigmoid), ", got ", act);
  TORCH_CHECK(u.scalar_type() == acc_of(s.scalar_type()), "cellkern_cuda: u must be ", acc_of(s.scalar_type()),
              " for ", s.scalar_type(), " inputs, got ", u.scalar_type());
  const Dtype t = dtype_of(s);
  const uint8_t* p_m = byte_ptr(mask, s, "mask");
  void* st = stream_of(stream);
  at::Tensor du = empty_output(s.sizes(), u.options());
  at::Tensor ds = need_s ? empty_output(s.sizes(), s.options()) : at::empty({0}, s.options());
  at::Tensor dw = need_w ? empty_output(w.sizes(), w.options()) : at::empty({0}, w.options());
  if (need_w) {  // du is formed (and stored) on the way
    check(cuda::weight_grad(L, t, g.data_ptr(), u.data_ptr(), leak, int(act), s.data_ptr(), p_m, dw.data_ptr(),
                      du.data_ptr(), st),
          "propagate_backward");
  } else {
    check(cuda::grad_u(s.numel(), t, g.data_ptr(), u.data_ptr(), leak, int(act), du.data_ptr(), st), "propagate_backward");
  }
  if (need_s) {
    check(cuda::gather_transposed(L, t, du.data_ptr(), w.data_ptr(), p_m, g.data_ptr(), 1.0 - leak, ds.data_ptr(), st),
          "propagate_backward");
  }
  return {ds, dw, du};
}

// ---- plasticity ----

Lattice cells_lattice(const at::Tensor& y, int64_t D, int64_t H, int64_t W, const at::Tensor& offsets,
                      const c10::List<bool>& periodic) {
  return make_lattice(y.size(0), 1, D, H, W, offsets, periodic, y);
}

at::Tensor neighbourhood_op(const at::Tensor& y, double param, Neighbourhood mode, const at::Tensor& offsets,
                            const c10::List<bool>& periodic, int64_t stream, const char* op) {
  TORCH_CHECK(y.dim() == 4, "cellkern_cuda: y must be [B, D, H, W], got ", y.sizes());
  check_cuda(y, "y", y);
  const Lattice L = cells_lattice(y, y.size(1), y.size(2), y.size(3), offsets, periodic);
  const at::ScalarType acc = acc_of(y.scalar_type());
  const at::Tensor ya = as_acc(y, acc);
  const bool winners = mode == Neighbourhood::kWinners;
  at::Tensor out = empty_output(y.sizes(), y.options().dtype(winners ? at::kBool : acc));
  check(cuda::neighbourhood(L, dtype_of(ya), ya.data_ptr(), param, mode, nullptr, out.data_ptr(), stream_of(stream)), op);
  return (winners || out.scalar_type() == y.scalar_type()) ? out : out.to(y.scalar_type());
}

at::Tensor lateral_inhibition(const at::Tensor& y, double beta, const at::Tensor& offsets, c10::List<bool> periodic,
                              int64_t stream) {
  return neighbourhood_op(y, beta, Neighbourhood::kInhibit, offsets, periodic, stream, "lateral_inhibition");
}

at::Tensor local_winners(const at::Tensor& y, double threshold, const at::Tensor& offsets, c10::List<bool> periodic,
                         int64_t stream) {
  return neighbourhood_op(y, threshold, Neighbourhood::kWinners, offsets, periodic, stream, "local_winners");
}

PlasticityParams params_of(const c10::List<bool>& flags, at::ArrayRef<double> scalars) {
  TORCH_CHECK(flags.size() == kParamFlags && scalars.size() == kParamScalars,
              "cellkern_cuda: plasticity_ takes ", kParamFlags, " flags and ", kParamScalars, " scalars");
  bool f[kParamFlags];
  for (int i = 0; i < kParamFlags; ++i) f[i] = flags.get(i);
  return unpack_params(f, scalars.data());
}

void plasticity_(at::Tensor& w, const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
                 c10::List<bool> periodic, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& spikes,
                 const std::optional<at::Tensor>& x_pre, const std::optional<at::Tensor>& x_post,
                 const std::optional<at::Tensor>& theta, const std::optional<at::Tensor>& gate,
                 const std::optional<at::Tensor>& lr, c10::List<bool> flags, at::ArrayRef<double> scalars,
                 int64_t stream) {
  TORCH_CHECK(w.dim() == 4, "cellkern_cuda: w must be [K, D, H, W], got ", w.sizes());
  check_cuda(w, "w", w);
  const PlasticityParams P = params_of(flags, scalars);
  const at::Tensor t_y = opt(y), t_sp = opt(spikes), t_xp = opt(x_pre), t_xq = opt(x_post), t_th = opt(theta),
                   t_g = opt(gate), t_lr = opt(lr);
  const at::Tensor& per_sample = t_y.defined() ? t_y : t_sp;
  TORCH_CHECK(per_sample.defined(), "cellkern_cuda: plasticity_ needs y or spikes");
  TORCH_CHECK(t_y.defined() || !(P.bcm || P.competition), "cellkern_cuda: BCM and competition need y");
  TORCH_CHECK(!P.stdp || (t_xp.defined() && t_xq.defined()), "cellkern_cuda: STDP needs both traces");
  TORCH_CHECK(!P.bcm || t_th.defined(), "cellkern_cuda: BCM needs theta");
  TORCH_CHECK(offsets.size(0) == w.size(0), "cellkern_cuda: w has ", w.size(0), " offsets, the stencil ",
              offsets.size(0));
  for (const at::Tensor* t : {&t_y, &t_sp, &t_xp, &t_xq, &t_th, &t_g, &t_lr}) {
    if (t->defined()) check_cuda(*t, "a per-cell field", w);
  }
  const int64_t B = per_sample.size(0);
  const Lattice L = make_lattice(B, 1, w.size(1), w.size(2), w.size(3), offsets, periodic, w);
  const at::ScalarType acc =
      (w.scalar_type() == at::kDouble || per_sample.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const Dtype a = acc == at::kDouble ? Dtype::kFloat64 : Dtype::kFloat32;
  void* st = stream_of(stream);

  at::Tensor ya = as_acc(t_y, acc), ga = as_acc(t_g, acc);
  if (P.competition) {  // y' and g = win(y')·gate, each a scratch the synapse pass reads
    at::Tensor yp = at::empty(ya.sizes(), ya.options());
    check(cuda::neighbourhood(L, a, ya.data_ptr(), P.beta, Neighbourhood::kInhibit, nullptr, yp.data_ptr(), st),
          "plasticity_");
    at::Tensor gs = at::empty(ya.sizes(), ya.options());
    check(cuda::neighbourhood(L, a, yp.data_ptr(), P.threshold, Neighbourhood::kGate, ptr(ga), gs.data_ptr(), st),
          "plasticity_");
    ya = yp;
    ga = gs;
  }
  at::Tensor xpa = as_acc(t_xp, acc), xqa = as_acc(t_xq, acc), tha = as_acc(t_th, acc);
  const at::Tensor spa = as_acc(t_sp, acc), lra = as_acc(t_lr, acc);
  const CellFields F{ptr(ya), ptr(spa), ptr(xpa), ptr(xqa), ptr(tha), ptr(ga), ptr(lra)};
  // fp64 arithmetic takes fp32 or fp64 weights; fp16/bf16 ones go through an
  // fp64 copy (rounded back once, as the reference does)
  const bool copy_w = acc == at::kDouble && w.scalar_type() != at::kDouble && w.scalar_type() != at::kFloat;
  at::Tensor ww = copy_w ? w.to(at::kDouble) : w;
  check(cuda::plasticity_synapses(L, P, dtype_of(ww), a, ww.data_ptr(), byte_ptr(mask, w, "mask"), F, st), "plasticity_");
  if (copy_w) w.copy_(ww);
  check(cuda::plasticity_cells(B, int64_t(L.D) * L.H * L.W, P, a, F, ptr(xpa) ? xpa.data_ptr() : nullptr,
                         ptr(xqa) ? xqa.data_ptr() : nullptr, ptr(tha) ? tha.data_ptr() : nullptr, st),
        "plasticity_");
  // traces and θ held in another dtype were updated in a copy
  if (P.stdp && !xpa.is_same(t_xp)) {
    t_xp.copy_(xpa);
    t_xq.copy_(xqa);
  }
  if (P.bcm && !tha.is_same(t_th)) t_th.copy_(tha);
}

void heterosynaptic_normalize_(at::Tensor& w, const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
                               c10::List<bool> periodic, const at::Tensor& target,
                               const std::optional<at::Tensor>& where, int64_t stream) {
  TORCH_CHECK(w.dim() == 4, "cellkern_cuda: w must be [K, D, H, W], got ", w.sizes());
  check_cuda(w, "w", w);
  check_cuda(target, "target", w);
  const Lattice L = make_lattice(1, 1, w.size(1), w.size(2), w.size(3), offsets, periodic, w);
  const at::Tensor ta = as_acc(target, acc_of(w.scalar_type()));
  check(cuda::normalize(L, dtype_of(w), dtype_of(ta), w.data_ptr(), byte_ptr(mask, w, "mask"), ta.data_ptr(),
                  byte_ptr(where, w, "where"), stream_of(stream)),
        "heterosynaptic_normalize_");
}

// ---- the mixing form ----

struct MixShape {
  Lattice L;
  int B, Ci, Co;
};

MixShape mix_shape(const at::Tensor& s, const at::Tensor& w, const at::Tensor& offsets,
                   const c10::List<bool>& periodic) {
  TORCH_CHECK(s.dim() == 5, "cellkern_cuda: s must be [B, C_in, D, H, W], got ", s.sizes());
  TORCH_CHECK(w.dim() == 6 && w.size(0) == offsets.size(0) && w.size(2) == s.size(1) && w.size(3) == s.size(2) &&
                  w.size(4) == s.size(3) && w.size(5) == s.size(4),
              "cellkern_cuda: w must be [K, C_out, C_in, D, H, W] for s ", s.sizes(), ", got ", w.sizes());
  check_cuda(s, "s", s);
  check_cuda(w, "w", s);
  MixShape m;
  m.L = make_lattice(s.size(0) * s.size(1), s.size(1), s.size(2), s.size(3), s.size(4), offsets, periodic, s);
  m.B = int(s.size(0));
  m.Ci = int(s.size(1));
  m.Co = int(w.size(1));
  return m;
}

at::Tensor mixing_aggregate_forward(const at::Tensor& s, const at::Tensor& w, const std::optional<at::Tensor>& mask,
                                    const at::Tensor& offsets, c10::List<bool> periodic, int64_t stream) {
  const MixShape m = mix_shape(s, w, offsets, periodic);
  TORCH_CHECK(w.scalar_type() == s.scalar_type(), "cellkern_cuda: w must be ", s.scalar_type(), ", got ",
              w.scalar_type());
  at::Tensor a = empty_output({m.B, m.Co, s.size(2), s.size(3), s.size(4)}, s.options());
  check(cuda::mixing_sum(m.L, m.B, m.Ci, m.Co, dtype_of(s), s.data_ptr(), w.data_ptr(), byte_ptr(mask, s, "mask"),
                         a.data_ptr(), nullptr, stream_of(stream)),
        "mixing_aggregate_forward");
  return a;
}

std::tuple<at::Tensor, at::Tensor> mixing_aggregate_backward(const at::Tensor& g, const at::Tensor& s,
                                                              const at::Tensor& w,
                                                              const std::optional<at::Tensor>& mask,
                                                              const at::Tensor& offsets, c10::List<bool> periodic,
                                                              bool need_s, bool need_w, int64_t stream) {
  const MixShape m = mix_shape(s, w, offsets, periodic);
  TORCH_CHECK(w.scalar_type() == s.scalar_type(), "cellkern_cuda: w must be ", s.scalar_type(), ", got ",
              w.scalar_type());
  check_cuda(g, "g", s);
  const at::ScalarType acc = acc_of(s.scalar_type());
  const at::Tensor ga = as_acc(g, acc);
  const uint8_t* p_m = byte_ptr(mask, s, "mask");
  at::Tensor ds = need_s ? empty_output(s.sizes(), s.options()) : at::empty({0}, s.options());
  at::Tensor dw = need_w ? empty_output(w.sizes(), w.options()) : at::empty({0}, w.options());
  if (need_s) {
    check(cuda::mixing_transposed(m.L, m.B, m.Ci, m.Co, dtype_of(s), ga.data_ptr(), w.data_ptr(), p_m, nullptr, 0.0,
                                  ds.data_ptr(), stream_of(stream)),
          "mixing_aggregate_backward");
  }
  if (need_w) {
    const at::Tensor sa = as_acc(s, acc);
    check(cuda::mixing_weight_grad(m.L, m.B, m.Ci, m.Co, dtype_of(w), ga.data_ptr(), sa.data_ptr(), p_m,
                                   dw.data_ptr(), stream_of(stream)),
          "mixing_aggregate_backward");
  }
  return {ds, dw};
}

std::tuple<at::Tensor, at::Tensor> mixing_propagate_forward(const at::Tensor& s, const at::Tensor& w,
                                                             const std::optional<at::Tensor>& mask,
                                                             const std::optional<at::Tensor>& x,
                                                             const std::optional<at::Tensor>& bias,
                                                             const at::Tensor& offsets, c10::List<bool> periodic,
                                                             double leak, int64_t act, bool save_u, int64_t stream) {
  const MixShape m = mix_shape(s, w, offsets, periodic);
  TORCH_CHECK(w.scalar_type() == s.scalar_type(), "cellkern_cuda: w must be ", s.scalar_type(), ", got ",
              w.scalar_type());
  TORCH_CHECK(m.Co == m.Ci, "cellkern_cuda: mixing_propagate_forward needs C_out == C_in, got ", m.Co, " and ", m.Ci);
  TORCH_CHECK(act >= 0 && act <= 4, "cellkern_cuda: act must be 0..4, got ", act);
  const at::Tensor tx = opt(x), tb = opt(bias);
  if (tx.defined()) check_cuda(tx, "x", s);
  if (tb.defined()) check_cuda(tb, "bias", s);
  const auto u_opts = s.options().dtype(acc_of(s.scalar_type()));
  at::Tensor out = empty_output(s.sizes(), s.options());
  at::Tensor u = at::empty(s.sizes(), u_opts);  // a, then u (returned when save_u)
  void* st = stream_of(stream);
  check(cuda::mixing_sum(m.L, m.B, m.Ci, m.Co, dtype_of(s), s.data_ptr(), w.data_ptr(), byte_ptr(mask, s, "mask"),
                         nullptr, u.data_ptr(), st),
        "mixing_propagate_forward");
  check(cuda::mixing_cell_update(m.B, m.Co, s.size(2) * s.size(3) * s.size(4), dtype_of(s), s.data_ptr(), ptr(tx),
                                 ptr(tb), leak, int(act), out.data_ptr(), u.data_ptr(), st),
        "mixing_propagate_forward");
  return {out, save_u ? u : at::empty({0}, u_opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixing_propagate_backward(
    const at::Tensor& g, const at::Tensor& s, const at::Tensor& w, const std::optional<at::Tensor>& mask,
    const at::Tensor& u, const at::Tensor& offsets, c10::List<bool> periodic, double leak, int64_t act, bool need_s,
    bool need_w, int64_t stream) {
  const MixShape m = mix_shape(s, w, offsets, periodic);
  TORCH_CHECK(w.scalar_type() == s.scalar_type(), "cellkern_cuda: w must be ", s.scalar_type(), ", got ",
              w.scalar_type());
  TORCH_CHECK(m.Co == m.Ci, "cellkern_cuda: mixing_propagate_backward needs C_out == C_in, got ", m.Co, " and ", m.Ci);
  TORCH_CHECK(act >= 0 && act <= 4, "cellkern_cuda: act must be 0..4, got ", act);
  check_cuda(g, "g", s);
  check_cuda(u, "u", s);
  const at::ScalarType acc = acc_of(s.scalar_type());
  TORCH_CHECK(u.scalar_type() == acc, "cellkern_cuda: u must be ", acc, " for ", s.scalar_type(), " inputs, got ",
              u.scalar_type());
  const uint8_t* p_m = byte_ptr(mask, s, "mask");
  void* st = stream_of(stream);
  at::Tensor du = empty_output(s.sizes(), u.options());
  at::Tensor ds = need_s ? empty_output(s.sizes(), s.options()) : at::empty({0}, s.options());
  at::Tensor dw = need_w ? empty_output(w.sizes(), w.options()) : at::empty({0}, w.options());
  check(cuda::mixing_grad_u(m.B, m.Co, s.size(2) * s.size(3) * s.size(4), dtype_of(s), g.data_ptr(), u.data_ptr(),
                            leak, int(act), du.data_ptr(), st),
        "mixing_propagate_backward");
  if (need_s) {
    check(cuda::mixing_transposed(m.L, m.B, m.Ci, m.Co, dtype_of(s), du.data_ptr(), w.data_ptr(), p_m, g.data_ptr(),
                                  1.0 - leak, ds.data_ptr(), st),
          "mixing_propagate_backward");
  }
  if (need_w) {
    const at::Tensor sa = as_acc(s, acc);
    check(cuda::mixing_weight_grad(m.L, m.B, m.Ci, m.Co, dtype_of(w), du.data_ptr(), sa.data_ptr(), p_m,
                                   dw.data_ptr(), st),
          "mixing_propagate_backward");
  }
  return {ds, dw, du};
}

void competitive_hebbian_(at::Tensor& w, const at::Tensor& s, at::Tensor& beta, const std::optional<at::Tensor>& mask,
                          const at::Tensor& offsets, c10::List<bool> periodic, double eta, double tau,
                          double eta_beta, bool wins, int64_t stream) {
  const MixShape m = mix_shape(s, w, offsets, periodic);
  TORCH_CHECK(tau >= 0, "cellkern_cuda: competitive_hebbian_: tau must be >= 0, got ", tau);
  check_cuda(beta, "beta", s);
  TORCH_CHECK(beta.numel() == int64_t(m.Co) * m.L.D * m.L.H * m.L.W,
              "cellkern_cuda: competitive_hebbian_: beta must be [C_out, D, H, W], got ", beta.sizes());
  // fp64 arithmetic when w or s is fp64 (then a w of another dtype goes through an fp64 copy)
  const at::ScalarType acc =
      (w.scalar_type() == at::kDouble || s.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const bool copy_w = acc == at::kDouble && w.scalar_type() != at::kDouble;
  at::Tensor ww = copy_w ? w.to(at::kDouble) : w;
  const at::Tensor sa = as_acc(s, acc);
  at::Tensor ba = as_acc(beta, acc);
  const auto a_opts = s.options().dtype(acc);
  at::Tensor up = at::empty({m.B, m.Co, s.size(2), s.size(3), s.size(4)}, a_opts);
  at::Tensor q = at::empty(beta.sizes(), a_opts), scale = at::empty(beta.sizes(), a_opts);
  check(cuda::competitive_hebbian(m.L, m.B, m.Ci, m.Co, dtype_of(ww), ww.data_ptr(), sa.data_ptr(),
                                  byte_ptr(mask, s, "mask"), ba.data_ptr(), up.data_ptr(), q.data_ptr(),
                                  scale.data_ptr(), eta, tau, eta_beta, wins, stream_of(stream)),
        "competitive_hebbian_");
  if (copy_w) w.copy_(ww);
  if (!ba.is_same(beta)) beta.copy_(ba);
}

}  // namespace glue
}  // namespace cuda
}  // namespace cellkern

CK_TORCH_LIBRARY(CK_CUDA_LIBRARY, m) {
  m.def("set_poison(bool on) -> ()", &cellkern::cuda::glue::set_poison);
  m.def("new_output(int[] size, ScalarType dtype, Device device) -> Tensor", &cellkern::cuda::glue::new_output);
  m.def("aggregate_forward(Tensor s, Tensor w, Tensor? mask, Tensor offsets, bool[] periodic, int stream) -> Tensor");
  m.def(
      "aggregate_transposed(Tensor g, Tensor w, Tensor? mask, Tensor offsets, bool[] periodic, int stream) -> Tensor");
  m.def("weight_grad(Tensor g, Tensor s, Tensor? mask, Tensor offsets, bool[] periodic, int stream) -> Tensor");
  m.def(
      "propagate_forward(Tensor s, Tensor w, Tensor? mask, Tensor? x, Tensor? bias, Tensor offsets, "
      "bool[] periodic, float leak, int act, bool save_u, int stream) -> (Tensor, Tensor)");
  m.def(
      "propagate_backward(Tensor g, Tensor s, Tensor w, Tensor? mask, Tensor u, Tensor offsets, "
      "bool[] periodic, float leak, int act, bool need_s, bool need_w, int stream) -> (Tensor, Tensor, Tensor)");
  m.def("lateral_inhibition(Tensor y, float beta, Tensor offsets, bool[] periodic, int stream) -> Tensor");
  m.def("local_winners(Tensor y, float threshold, Tensor offsets, bool[] periodic, int stream) -> Tensor");
  m.def(
      "plasticity_(Tensor(a!) w, Tensor? mask, Tensor offsets, bool[] periodic, Tensor? y, Tensor? spikes, "
      "Tensor(b!)? x_pre, Tensor(c!)? x_post, Tensor(d!)? theta, Tensor? gate, Tensor? lr, bool[] flags, "
      "float[] scalars, int stream) -> ()");
  m.def(
      "heterosynaptic_normalize_(Tensor(a!) w, Tensor? mask, Tensor offsets, bool[] periodic, Tensor target, "
      "Tensor? where, int stream) -> ()");
  m.def(
      "mixing_aggregate_forward(Tensor s, Tensor w, Tensor? mask, Tensor offsets, bool[] periodic, int stream) "
      "-> Tensor");
  m.def(
      "mixing_aggregate_backward(Tensor g, Tensor s, Tensor w, Tensor? mask, Tensor offsets, bool[] periodic, "
      "bool need_s, bool need_w, int stream) -> (Tensor, Tensor)");
  m.def(
      "mixing_propagate_forward(Tensor s, Tensor w, Tensor? mask, Tensor? x, Tensor? bias, Tensor offsets, "
      "bool[] periodic, float leak, int act, bool save_u, int stream) -> (Tensor, Tensor)");
  m.def(
      "mixing_propagate_backward(Tensor g, Tensor s, Tensor w, Tensor? mask, Tensor u, Tensor offsets, "
      "bool[] periodic, float leak, int act, bool need_s, bool need_w, int stream) -> (Tensor, Tensor, Tensor)");
  m.def(
      "competitive_hebbian_(Tensor(a!) w, Tensor s, Tensor(b!) beta, Tensor? mask, Tensor offsets, "
      "bool[] periodic, float eta, float tau, float eta_beta, bool wins, int stream) -> ()");
}

CK_TORCH_LIBRARY_IMPL(CK_CUDA_LIBRARY, CK_CUDA_KEY, m) {
  m.impl("aggregate_forward", &cellkern::cuda::glue::aggregate_forward);
  m.impl("aggregate_transposed", &cellkern::cuda::glue::aggregate_transposed);
  m.impl("weight_grad", &cellkern::cuda::glue::weight_grad);
  m.impl("propagate_forward", &cellkern::cuda::glue::propagate_forward);
  m.impl("propagate_backward", &cellkern::cuda::glue::propagate_backward);
  m.impl("lateral_inhibition", &cellkern::cuda::glue::lateral_inhibition);
  m.impl("local_winners", &cellkern::cuda::glue::local_winners);
  m.impl("plasticity_", &cellkern::cuda::glue::plasticity_);
  m.impl("heterosynaptic_normalize_", &cellkern::cuda::glue::heterosynaptic_normalize_);
  m.impl("mixing_aggregate_forward", &cellkern::cuda::glue::mixing_aggregate_forward);
  m.impl("mixing_aggregate_backward", &cellkern::cuda::glue::mixing_aggregate_backward);
  m.impl("mixing_propagate_forward", &cellkern::cuda::glue::mixing_propagate_forward);
  m.impl("mixing_propagate_backward", &cellkern::cuda::glue::mixing_propagate_backward);
  m.impl("competitive_hebbian_", &cellkern::cuda::glue::competitive_hebbian_);
}

// The ops live in torch.ops.cellkern_cuda; the module itself is empty.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
