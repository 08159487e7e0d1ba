// plasticity_pass instantiated for fp32 weights and state (the benchmarked path)
// (one file per dtype pair group: the groups compile in parallel).
#include "plasticity_pass.h"

namespace cellkern {
namespace cpu {

CELLKERN_PLASTICITY_PASS(float, float);

}  // namespace cpu
}  // namespace cellkern
