// plasticity_pass instantiated for fp64 arithmetic (fp32 or fp64 weights)
// (one file per dtype pair group: the groups compile in parallel).
#include "plasticity_pass.h"

namespace cellkern {
namespace cpu {

CELLKERN_PLASTICITY_PASS(float, double);
CELLKERN_PLASTICITY_PASS(double, double);

}  // namespace cpu
}  // namespace cellkern
