// The backends' contract on the C++ side: the facts the compiled kernels
// share with Python (cellkern/contract.py). One definition each; no torch and
// no CUDA headers, so the CPU kernels, the CUDA glue and the .cu files all
// include it. python_tests/test_contract.py parses this file and fails when it
// and cellkern/contract.py disagree (names, codes, order, counts).
#pragma once

#include <cstdint>

namespace cellkern {

/// The activation codes of the propagate family
/// (cellkern.contract.ACTIVATION_CODES).
/// kTriangle (relu(u[o] − mean_c u[c]) over a cell's channels) is taken by the
/// mixing-form kernels only; the shared form's kernels take kIdentity..kSigmoid.
enum Act : int64_t { kIdentity = 0, kTanh = 1, kRelu = 2, kSigmoid = 3, kTriangle = 4 };

/// The number of activation codes (0 .. kActCount - 1).
constexpr int64_t kActCount = 5;

/// The order of the flags of cellkern::plasticity_
/// (cellkern.contract.PARAM_FLAGS).
enum ParamFlag : int {
  kFlagStdp = 0,
  kFlagMultiplicative = 1,
  kFlagBcm = 2,
  kFlagCompetition = 3,
  kFlagNormalize = 4,
};

/// The order of the scalars of cellkern::plasticity_
/// (cellkern.contract.PARAM_SCALARS).
enum ParamScalar : int {
  kScalarAPlus = 0,
  kScalarAMinus = 1,
  kScalarDecayPre = 2,
  kScalarDecayPost = 3,
  kScalarBcmLr = 4,
  kScalarBcmDecay = 5,
  kScalarTauTheta = 6,
  kScalarThetaMin = 7,
  kScalarThetaMax = 8,
  kScalarBeta = 9,
  kScalarThreshold = 10,
  kScalarWMin = 11,
  kScalarWMax = 12,
};

/// How many flags and scalars the op schemas pass.
constexpr int kParamFlags = 5, kParamScalars = 13;

static_assert(kFlagNormalize + 1 == kParamFlags, "contract.h: a flag without its index, or a gap");
static_assert(kScalarWMax + 1 == kParamScalars, "contract.h: a scalar without its index, or a gap");
static_assert(kTriangle + 1 == kActCount, "contract.h: an activation without its code, or a gap");

}  // namespace cellkern
