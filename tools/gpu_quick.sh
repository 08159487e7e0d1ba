#!/usr/bin/env bash
# The GPU check sized for a short device lease (one call of ~6 device-minutes):
# build cellkern._C_cuda alone for sm_90, the 128³ benchmarks of the issue's
# targets (propagate B·C = 1 and 16; the fused plasticity step B = 1) for
# triton and cuda, the cuda/triton test matrix of the propagation and
# plasticity ops, and the ptxas table. No CPU extension is built there, so the
# cpu backend is absent on that machine (nothing below needs it).
#   tools/gpu_quick.sh OUTDIR          (on the device: tools/gpu_quick.sh $OUT/gpu)
set -u
OUT=${1:?usage: tools/gpu_quick.sh OUTDIR}
mkdir -p "$OUT"
export GPU_CHECK_BUILD=cuda PY=${PY:-python}
export GPU_CHECK_BENCH="propagate plasticity"
export GPU_CHECK_ARGS_propagate="--sizes 128,128,128 --bc 1 16 --backends triton cuda"
export GPU_CHECK_ARGS_plasticity="--sizes 128,128,128 --batch 1 --ops fused --backends triton cuda"
export GPU_CHECK_PYTEST="python_tests/test_propagate.py python_tests/test_plasticity.py python_tests/test_competition.py python_tests/test_plasticity_rules.py python_tests/test_stencil.py"
export GPU_CHECK_K=${GPU_CHECK_K:-"cuda or triton"}
export GPU_CHECK_BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-240} GPU_CHECK_TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-240}
status=0
tools/gpu_check.sh "$OUT" || status=1
$PY tools/ptxas_report.py --arch 90 --json "$OUT/ptxas.json" > "$OUT/ptxas.txt" 2>&1 || true
exit $status
