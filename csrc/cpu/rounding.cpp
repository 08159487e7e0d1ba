// Seeded stochastic rounding of fp32 weights to fp16/bf16 (SPEC §5), the
// C++ twin of cellkern/ops/rounding.py: the same counter-based hash of
// (seed, step, flat index), the same comparison in fp32, so both give the
// same bits.
//
//   u = (mix(mix(lo(j)) ^ hi(j) ^ key) >> 8) / 2^24,  key = mix(mix(seed) ^ lo(step) ^ mix(hi(step)))
//   out[j] = the far neighbour of x = src[j] when u < (x − near)/(far − near), else near = RTN(x)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cellkern {
namespace cpu {
namespace {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

template <typename T>
inline uint16_t bits_of(T v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}

template <typename T>
inline T from_bits(uint16_t b) {
  T v;
  std::memcpy(&v, &b, 2);
  return v;
}

// The next representable value of v towards +inf (up) or -inf (down); finite v.
template <typename T>
inline T step_from(T v, bool up) {
  const uint16_t b = bits_of(v);
  const bool neg = (b & 0x8000u) != 0;
  if ((b & 0x7FFFu) == 0) return from_bits<T>(up ? 0x0001u : 0x8001u);  // ±0 → ± smallest subnormal
  return from_bits<T>(static_cast<uint16_t>(up != neg ? b + 1 : b - 1));
}

template <typename T>
void round_impl(T* p_out, const float* p_src, int64_t n, uint32_t key) {
  at::parallel_for(0, n, 65536, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float x = p_src[j];
      const T y = static_cast<T>(x);
      const float yx = static_cast<float>(y);
      T r = y;
      if (yx != x) {
        const T other = step_from(y, yx < x);
        const float gap = static_cast<float>(other) - yx;
        if (gap != 0.0f && std::isfinite(gap)) {
          const float p = (x - yx) / gap;
          const uint32_t h = mix32(mix32(static_cast<uint32_t>(j)) ^ static_cast<uint32_t>(uint64_t(j) >> 32) ^ key);
          const float u = static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
          if (u < p) r = other;
        }
      }
      p_out[j] = r;
    }
  });
}

}  // namespace

void stochastic_round_(at::Tensor& out, const at::Tensor& src, int64_t seed, int64_t step) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && src.is_contiguous() && out.is_contiguous() &&
                  out.numel() == src.numel(),
              "cellkern_cpu: stochastic_round_ takes a contiguous fp32 src and out of the same size");
  const uint64_t st = static_cast<uint64_t>(step);
  const uint32_t key = mix32(mix32(static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(st) ^
                             mix32(static_cast<uint32_t>(st >> 32)));
  if (out.scalar_type() == at::kBFloat16) {
    round_impl(out.data_ptr<c10::BFloat16>(), src.data_ptr<float>(), src.numel(), key);
  } else {
    TORCH_CHECK(out.scalar_type() == at::kHalf, "cellkern_cpu: stochastic_round_ rounds to fp16 or bf16, got ",
                out.scalar_type());
    round_impl(out.data_ptr<c10::Half>(), src.data_ptr<float>(), src.numel(), key);
  }
}

}  // namespace cpu
}  // namespace cellkern
