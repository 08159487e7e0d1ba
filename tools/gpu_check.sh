#!/usr/bin/env bash
# The GPU check (make gpu-check): optionally build the extension with the CUDA
# C++ kernels, then the benchmarks on CUDA tensors (each correctness-gated
# against the reference), then the test matrix with Triton and cuda on the GPU.
# Uses the python that already has a CUDA torch (PY, default python3); installs nothing.
#   tools/gpu_check.sh [OUTDIR]       logs and JSON results go to OUTDIR too
# Env: GPU_CHECK_BUILD=1 builds first, with the CUDA C++ kernels (CELLKERN_CUDA=1,
#      TORCH_CUDA_ARCH_LIST default 9.0, MAX_JOBS default 16; an extension that
#      is up to date is not rebuilt); GPU_CHECK_BUILD=cuda builds cellkern._C_cuda
#      alone (CELLKERN_BUILD_ONLY=cuda: no CPU extension, the quickest way to the
#      cuda backend on a fresh machine); a failed build stops the check.
#      GPU_CHECK_BENCH="propagate plasticity" which benchmarks; GPU_CHECK_ARGS_<bench>: its options;
#      GPU_CHECK_BENCH_TIMEOUT / GPU_CHECK_TEST_TIMEOUT: seconds per step;
#      GPU_CHECK_JOBS (pytest -n); GPU_CHECK_K: a pytest -k expression.
set -u
build=${GPU_CHECK_BUILD:-0}
case "$build" in
  0|1) only="" ;;
  cuda) only=cuda ;;
  *) echo "GPU_CHECK_BUILD must be 0, 1 or cuda, got '$build'"; exit 2 ;;
esac
PY=${PY:-python3}
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
log() { echo "== $(date +%T) $*"; }
log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"
if [ "$build" != 0 ]; then
  log "build${only:+ (only _C_cuda)}"
  t0=$(date +%s)
  if ! CELLKERN_BUILD_ONLY=$only CELLKERN_CUDA=${CELLKERN_CUDA:-1} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
       MAX_JOBS=${MAX_JOBS:-16} $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; log "build failed"; exit 1
  fi
  log "built in $(( $(date +%s) - t0 )) s"
  if [ "${CELLKERN_CUDA:-1}" = 1 ]; then
    $PY -c "import cellkern as ck, sys; s = ck.backend_status()['cuda']; print('cuda backend:', s); sys.exit(s != 'available')" || status=1
  fi
fi
$PY -m cellkern.info || status=1
for b in ${GPU_CHECK_BENCH:-propagate plasticity}; do
  log "benchmark $b"
  extra=GPU_CHECK_ARGS_$b
  timeout ${GPU_CHECK_BENCH_TIMEOUT:-1200} $PY -m benchmarks.$b --device cuda ${GPU_CHECK_BENCH_ARGS:-} ${!extra:-} || status=1
  cp benchmarks/results/$b-cuda-* "$OUT/" 2>/dev/null
done
log "tests"
jobs=${GPU_CHECK_JOBS:-8}
xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n $jobs"
timeout ${GPU_CHECK_TEST_TIMEOUT:-1200} $PY -m pytest -q -rfE $xdist -p no:cacheprovider ${GPU_CHECK_PYTEST:-python_tests} \
   ${GPU_CHECK_K:+-k "$GPU_CHECK_K"} --maxfail=40 --junitxml="$OUT/pytest.xml" -o junit_family=xunit2 2>&1 | tail -${GPU_CHECK_TAIL:-80}
[ "${PIPESTATUS[0]}" = 0 ] || status=1
log "done, status $status"
exit $status
