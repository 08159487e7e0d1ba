// plasticity_pass instantiated for bf16 weights, fp32 arithmetic
// (one file per dtype pair group: the groups compile in parallel).
#include "plasticity_pass.h"

namespace cellkern {
namespace cpu {

CELLKERN_PLASTICITY_PASS(c10::BFloat16, float);

}  // namespace cpu
}  // namespace cellkern
