// Op registration, in one place: the schemas of the torch.ops.cellkern_cpu
// namespace and their CPU kernels (csrc/cpu/). Importing the Python module
// cellkern._C runs these static registrations.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace cellkern {
namespace cpu {

void set_poison(bool on);
at::Tensor new_output(c10::IntArrayRef size, c10::ScalarType dtype);
at::Tensor aggregate_forward(const at::Tensor& s, const at::Tensor& w, const std::optional<at::Tensor>& mask,
                             const at::Tensor& offsets, c10::List<bool> periodic);
at::Tensor aggregate_transposed(const at::Tensor& g, const at::Tensor& w, const std::optional<at::Tensor>& mask,
                                const at::Tensor& offsets, c10::List<bool> periodic);
at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& s, const std::optional<at::Tensor>& mask,
                       const at::Tensor& offsets, c10::List<bool> periodic);
std::tuple<at::Tensor, at::Tensor> propagate_forward(const at::Tensor& s, const at::Tensor& w,
                                                     const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& x,
                                                     const std::optional<at::Tensor>& bias,
                                                     const at::Tensor& offsets, c10::List<bool> periodic,
                                                     double leak, int64_t act, bool save_u);
std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_backward(
    const at::Tensor& g, const at::Tensor& s, const at::Tensor& w, const std::optional<at::Tensor>& mask,
    const at::Tensor& u, const at::Tensor& offsets, c10::List<bool> periodic, double leak, int64_t act,
    bool need_s, bool need_w);

at::Tensor lateral_inhibition(const at::Tensor& y, double beta, const at::Tensor& offsets, c10::List<bool> periodic);
at::Tensor local_winners(const at::Tensor& y, double threshold, const at::Tensor& offsets, c10::List<bool> periodic);
void plasticity_(at::Tensor& w, const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
                 c10::List<bool> periodic, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& spikes,
                 const std::optional<at::Tensor>& x_pre, const std::optional<at::Tensor>& x_post,
                 const std::optional<at::Tensor>& theta, const std::optional<at::Tensor>& gate,
                 const std::optional<at::Tensor>& lr, c10::List<bool> flags, at::ArrayRef<double> scalars);
void heterosynaptic_normalize_(at::Tensor& w, const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
                               c10::List<bool> periodic, const at::Tensor& target,
                               const std::optional<at::Tensor>& where);
std::tuple<at::Tensor, at::Tensor> ell_expand(const at::Tensor& w_ell, const at::Tensor& idx, int64_t K);
void ell_gather_(at::Tensor& w_ell, const at::Tensor& idx, const at::Tensor& dense);
void stochastic_round_(at::Tensor& out, const at::Tensor& src, int64_t seed, int64_t step);
at::Tensor aggregate_forward_ell(const at::Tensor& s, const at::Tensor& w_ell, const at::Tensor& idx,
                                 const at::Tensor& offsets, c10::List<bool> periodic);
std::tuple<at::Tensor, at::Tensor> propagate_forward_ell(const at::Tensor& s, const at::Tensor& w_ell,
                                                         const at::Tensor& idx, const std::optional<at::Tensor>& x,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& offsets, c10::List<bool> periodic,
                                                         double leak, int64_t act, bool save_u);

at::Tensor mixing_aggregate_forward(const at::Tensor& s, const at::Tensor& w, const std::optional<at::Tensor>& mask,
                                    const at::Tensor& offsets, c10::List<bool> periodic);
std::tuple<at::Tensor, at::Tensor> mixing_aggregate_backward(const at::Tensor& g, const at::Tensor& s,
                                                              const at::Tensor& w,
                                                              const std::optional<at::Tensor>& mask,
                                                              const at::Tensor& offsets, c10::List<bool> periodic,
                                                              bool need_s, bool need_w);
std::tuple<at::Tensor, at::Tensor> mixing_propagate_forward(const at::Tensor& s, const at::Tensor& w,
                                                             const std::optional<at::Tensor>& mask,
                                                             const std::optional<at::Tensor>& x,
                                                             const std::optional<at::Tensor>& bias,
                                                             const at::Tensor& offsets, c10::List<bool> periodic,
                                                             double leak, int64_t act, bool save_u);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixing_propagate_backward(
    const at::Tensor& g, const at::Tensor& s, const at::Tensor& w, const std::optional<at::Tensor>& mask,
    const at::Tensor& u, const at::Tensor& offsets, c10::List<bool> periodic, double leak, int64_t act, bool need_s,
    bool need_w);
void competitive_hebbian_(at::Tensor& w, const at::Tensor& s, at::Tensor& beta, const std::optional<at::Tensor>& mask,
                          const at::Tensor& offsets, c10::List<bool> periodic, double eta, double tau,
                          double eta_beta, bool wins);

}  // namespace cpu
}  // namespace cellkern

TORCH_LIBRARY(cellkern_cpu, m) {
  m.def("set_poison(bool on) -> ()", &cellkern::cpu::set_poison);
  m.def("new_output(int[] size, ScalarType dtype) -> Tensor", &cellkern::cpu::new_output);
  m.def("aggregate_forward(Tensor s, Tensor w, Tensor? mask, Tensor offsets, bool[] periodic) -> Tensor");
  m.def("aggregate_transposed(Tensor g, Tensor w, Tensor? mask, Tensor offsets, bool[] periodic) -> Tensor");
  m.def("weight_grad(Tensor g, Tensor s, Tensor? mask, Tensor offsets, bool[] periodic) -> Tensor");
  m.def(
      "propagate_forward(Tensor s, Tensor w, Tensor? mask, Tensor? x, Tensor? bias, Tensor offsets, "
      "bool[] periodic, float leak, int act, bool save_u) -> (Tensor, Tensor)");
  m.def(
      "propagate_backward(Tensor g, Tensor s, Tensor w, Tensor? mask, Tensor u, Tensor offsets, "
      "bool[] periodic, float leak, int act, bool need_s, bool need_w) -> (Tensor, Tensor, Tensor)");
  m.def("lateral_inhibition(Tensor y, float beta, Tensor offsets, bool[] periodic) -> Tensor");
  m.def("local_winners(Tensor y, float threshold, Tensor offsets, bool[] periodic) -> Tensor");
  m.def(
      "plasticity_(Tensor(a!) w, Tensor? mask, Tensor offsets, bool[] periodic, Tensor? y, Tensor? spikes, "
      "Tensor(b!)? x_pre, Tensor(c!)? x_post, Tensor(d!)? theta, Tensor? gate, Tensor? lr, bool[] flags, "
      "float[] scalars) -> ()");
  m.def(
      "heterosynaptic_normalize_(Tensor(a!) w, Tensor? mask, Tensor offsets, bool[] periodic, Tensor target, "
      "Tensor? where) -> ()");
  m.def("ell_expand(Tensor w_ell, Tensor idx, int K) -> (Tensor, Tensor)");
  m.def("ell_gather_(Tensor(a!) w_ell, Tensor idx, Tensor dense) -> ()");
  m.def("stochastic_round_(Tensor(a!) out, Tensor src, int seed, int step) -> ()");
  m.def("aggregate_forward_ell(Tensor s, Tensor w_ell, Tensor idx, Tensor offsets, bool[] periodic) -> Tensor");
  m.def(
      "propagate_forward_ell(Tensor s, Tensor w_ell, Tensor idx, Tensor? x, Tensor? bias, Tensor offsets, "
      "bool[] periodic, float leak, int act, bool save_u) -> (Tensor, Tensor)");
  m.def("mixing_aggregate_forward(Tensor s, Tensor w, Tensor? mask, Tensor offsets, bool[] periodic) -> Tensor");
  m.def(
      "mixing_aggregate_backward(Tensor g, Tensor s, Tensor w, Tensor? mask, Tensor offsets, bool[] periodic, "
      "bool need_s, bool need_w) -> (Tensor, Tensor)");
  m.def(
      "mixing_propagate_forward(Tensor s, Tensor w, Tensor? mask, Tensor? x, Tensor? bias, Tensor offsets, "
      "bool[] periodic, float leak, int act, bool save_u) -> (Tensor, Tensor)");
  m.def(
      "mixing_propagate_backward(Tensor g, Tensor s, Tensor w, Tensor? mask, Tensor u, Tensor offsets, "
      "bool[] periodic, float leak, int act, bool need_s, bool need_w) -> (Tensor, Tensor, Tensor)");
  m.def(
      "competitive_hebbian_(Tensor(a!) w, Tensor s, Tensor(b!) beta, Tensor? mask, Tensor offsets, bool[] periodic, "
      "float eta, float tau, float eta_beta, bool wins) -> ()");
}

TORCH_LIBRARY_IMPL(cellkern_cpu, CPU, m) {
  m.impl("aggregate_forward", &cellkern::cpu::aggregate_forward);
  m.impl("aggregate_transposed", &cellkern::cpu::aggregate_transposed);
  m.impl("weight_grad", &cellkern::cpu::weight_grad);
  m.impl("propagate_forward", &cellkern::cpu::propagate_forward);
  m.impl("propagate_backward", &cellkern::cpu::propagate_backward);
  m.impl("lateral_inhibition", &cellkern::cpu::lateral_inhibition);
  m.impl("local_winners", &cellkern::cpu::local_winners);
  m.impl("plasticity_", &cellkern::cpu::plasticity_);
  m.impl("heterosynaptic_normalize_", &cellkern::cpu::heterosynaptic_normalize_);
  m.impl("ell_expand", &cellkern::cpu::ell_expand);
  m.impl("ell_gather_", &cellkern::cpu::ell_gather_);
  m.impl("stochastic_round_", &cellkern::cpu::stochastic_round_);
  m.impl("aggregate_forward_ell", &cellkern::cpu::aggregate_forward_ell);
  m.impl("propagate_forward_ell", &cellkern::cpu::propagate_forward_ell);
  m.impl("mixing_aggregate_forward", &cellkern::cpu::mixing_aggregate_forward);
  m.impl("mixing_aggregate_backward", &cellkern::cpu::mixing_aggregate_backward);
  m.impl("mixing_propagate_forward", &cellkern::cpu::mixing_propagate_forward);
  m.impl("mixing_propagate_backward", &cellkern::cpu::mixing_propagate_backward);
  m.impl("competitive_hebbian_", &cellkern::cpu::competitive_hebbian_);
}

// The vector ISA this file (and, with the same flags, every kernel of the
// extension) was compiled for: the compiler's predefined macros, widest first.
namespace {

// setup.py passes -DCELLKERN_MARCH=<arch> as bare tokens (x86-64-v3, native,
// none): quotes would not survive the shell of the ninja build.
#define CELLKERN_STR2(x) #x
#define CELLKERN_STR(x) CELLKERN_STR2(x)
#ifdef CELLKERN_MARCH
#define CELLKERN_MARCH_NAME CELLKERN_STR(CELLKERN_MARCH)
#else
#define CELLKERN_MARCH_NAME "unrecorded"
#endif

std::vector<std::string> isa_macros() {
  std::vector<std::string> out;
#if defined(__AVX512F__)
  out.push_back("__AVX512F__");
#endif
#if defined(__AVX512BW__)
  out.push_back("__AVX512BW__");
#endif
#if defined(__AVX512VL__)
  out.push_back("__AVX512VL__");
#endif
#if defined(__AVX2__)
  out.push_back("__AVX2__");
#endif
#if defined(__FMA__)
  out.push_back("__FMA__");
#endif
#if defined(__F16C__)
  out.push_back("__F16C__");
#endif
#if defined(__AVX__)
  out.push_back("__AVX__");
#endif
#if defined(__SSE4_2__)
  out.push_back("__SSE4_2__");
#endif
#if defined(__ARM_FEATURE_SVE)
  out.push_back("__ARM_FEATURE_SVE");
#endif
#if defined(__ARM_NEON)
  out.push_back("__ARM_NEON");
#endif
  return out;
}

// One word for the widest vector unit the kernels use.
std::string vector_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2-fma";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#elif defined(__ARM_FEATURE_SVE)
  return "sve";
#elif defined(__ARM_NEON)
  return "neon";
#elif defined(__SSE2__)
  return "sse2";
#else
  return "scalar";
#endif
}

}  // namespace

// The ops live in torch.ops.cellkern_cpu; the module records what it was built for.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("MARCH") = std::string(CELLKERN_MARCH_NAME);  // the -march of the build (setup.py: CELLKERN_MARCH)
  m.attr("VECTOR_ISA") = vector_isa();            // "avx512", "avx2-fma", "neon", ...
  m.attr("ISA_MACROS") = pybind11::cast(isa_macros());
}
