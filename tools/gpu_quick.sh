#!/usr/bin/env bash
# The GPU check of a short device lease, one call, sized to finish within
# GPU_QUICK_BUDGET seconds (default 450, under 8 minutes; the machine's start is extra):
#
#   step        budget s  what
#   build          110    cellkern._C_cuda alone for sm_90 (CELLKERN_BUILD_ONLY=cuda, TORCH_CUDA_ARCH_LIST=9.0)
#   propagate       75    benchmarks.propagate 128³, B·C = 1 and 16, fwd and fwd+bwd, triton and cuda (+ acceptance)
#   plasticity      60    benchmarks.plasticity 128³, B = 1, the fused step, triton and cuda (+ acceptance)
#   largest         60    benchmarks.largest: one plasticity-only stage at 666×666×333 and the largest 2:2:1 lattice
#   then side by side, after the timed steps (nothing below is a timing that counts):
#   tests          135    the cuda/triton test matrix (propagation, plasticity, competition, rules, stencil, device)
#   run            135    python -m cellkern.train.cli run --device cuda: the default schedule, its report
#   ptxas          135    tools/ptxas_report.py --arch 90 (compiles on the CPU)
#
# A step's timeout is what is left of the whole budget less the budgets of
# the steps after it (so time a step leaves unused goes to the next ones);
# a step with under 10 s is skipped. Each step's output goes to
# OUTDIR/<step>.log; the benchmark JSON to OUTDIR as well. At the end,
# OUTDIR/summary.txt (printed: the tables and the acceptance lines) and
# OUTDIR/results.tgz (everything, for benchmarks/results/) are the two files to
# bring back (the device tool returns at most 8).
#
#   tools/gpu_quick.sh OUTDIR              on the device: tools/gpu_quick.sh $OUT/gpu
#   DRY_RUN=1 tools/gpu_quick.sh OUTDIR    print the steps, their budgets and commands; run nothing
# Env: PY (default python3, the python with a CUDA torch), GPU_QUICK_BUDGET, GPU_QUICK_BUDGET_<step>
#      (one step's budget), GPU_QUICK_JOBS (pytest -n, default 8), GPU_QUICK_KEEP=1 keeps the loose
#      files beside results.tgz.
set -u
OUT=${1:?usage: tools/gpu_quick.sh OUTDIR}
PY=${PY:-python3}
BUDGET=${GPU_QUICK_BUDGET:-450}
DRY=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + BUDGET))
status=0
declare -A PID

TESTS="python_tests/test_propagate.py python_tests/test_plasticity.py python_tests/test_competition.py \
python_tests/test_plasticity_rules.py python_tests/test_stencil.py python_tests/test_device.py"
xdist=""
[ "$DRY" = 1 ] || { $PY -c "import xdist" 2>/dev/null && xdist="-n ${GPU_QUICK_JOBS:-8}"; }

declare -a NAMES BUDGETS CMDS
add() { local v=GPU_QUICK_BUDGET_$1; NAMES+=("$1"); BUDGETS+=("${!v:-$2}"); CMDS+=("$3"); }
add build 110 "CELLKERN_BUILD_ONLY=cuda CELLKERN_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY setup.py -q build_ext --inplace \
&& $PY -c \"import cellkern as ck, sys; s = ck.backend_status()['cuda']; print('cuda backend:', s); sys.exit(s != 'available')\""
add propagate 75 "$PY -m benchmarks.propagate --device cuda --sizes 128,128,128 --bc 1 16 --backends triton cuda"
add plasticity 60 "$PY -m benchmarks.plasticity --device cuda --sizes 128,128,128 --batch 1 --ops fused --backends triton cuda"
add largest 60 "$PY -m benchmarks.largest --device cuda --sizes preset largest --min-run-time 0.5"
add tests 135 "$PY -m pytest -q -rfE $xdist -p no:cacheprovider $TESTS -k 'cuda or triton' --maxfail=40 --junitxml=$OUT/pytest.xml -o junit_family=xunit2"
add run 135 "$PY -m cellkern.train.cli run --device cuda --out $OUT/run --no-progress"
add ptxas 135 "$PY tools/ptxas_report.py --arch 90 --json $OUT/ptxas.json"
PARALLEL="tests run ptxas"  # these start together, after the timed steps

log() { echo "== $(date +%T) +$(( $(date +%s) - START ))s $*"; }

budget_of() {  # the seconds step $1 may take now: what is left less the budgets of the steps after it
  local i later=0 seen=0 par=0
  for i in "${!NAMES[@]}"; do
    case " $PARALLEL " in
      *" ${NAMES[$i]} "*) [ "${BUDGETS[$i]}" -gt "$par" ] && par=${BUDGETS[$i]} ;;
      *) [ "$seen" = 1 ] && later=$((later + BUDGETS[i])) ;;
    esac
    [ "${NAMES[$i]}" = "$1" ] && seen=1
  done
  case " $PARALLEL " in *" $1 "*) par=0 ;; esac
  echo $(( DEADLINE - $(date +%s) - later - par ))
}

cmd_of() { local i; for i in "${!NAMES[@]}"; do [ "${NAMES[$i]}" = "$1" ] && echo "${CMDS[$i]}"; done; }

start_step() {  # start step $1 in the background under its timeout; its pid in PID[$1]
  local t; t=$(budget_of "$1")
  if [ "$t" -lt 10 ]; then
    log "$1 skipped: ${t}s left for it of the ${BUDGET}s budget" | tee -a "$OUT/summary.txt"
    status=1
    return 1
  fi
  log "$1 (timeout ${t}s)"
  timeout --kill-after=5 "$t" bash -c "$(cmd_of "$1")" > "$OUT/$1.log" 2>&1 &
  PID[$1]=$!
}

wait_step() {  # wait for step $1; note its status and time in the summary
  local rc
  [ -n "${PID[$1]:-}" ] || return 0
  wait "${PID[$1]}"; rc=$?
  unset "PID[$1]"
  case $rc in
    0) echo "$1: ok" >> "$OUT/summary.txt" ;;
    124|137) echo "$1: TIMEOUT (stopped at its budget)" >> "$OUT/summary.txt"; status=1 ;;
    *) echo "$1: FAILED (exit $rc)" >> "$OUT/summary.txt"; status=1 ;;
  esac
  log "$1 done, exit $rc"
  return $rc
}

if [ "$DRY" = 1 ]; then
  total=0
  for i in "${!NAMES[@]}"; do
    n=${NAMES[$i]}
    case " $PARALLEL " in *" $n "*) [ "$n" = tests ] && total=$((total + BUDGETS[i])); tag="(side by side)";; *) total=$((total + BUDGETS[i])); tag="";; esac
    printf 'step %-10s budget %4ss %s\n    %s\n' "$n" "${BUDGETS[$i]}" "$tag" "${CMDS[$i]}"
  done
  echo "longest path ${total}s of the ${BUDGET}s budget"
  exit 0
fi

mkdir -p "$OUT"
: > "$OUT/summary.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"
  git log -1 --format='commit %H %s' 2>/dev/null; } | tee "$OUT/device.txt"

{ start_step build && wait_step build; } || { tail -40 "$OUT/build.log"; log "build failed: nothing else runs"; exit 1; }
$PY -m cellkern.info > "$OUT/info.txt" 2>&1
for b in propagate plasticity largest; do
  start_step $b; wait_step $b
  sed -n '/^size DxHxW/,$p' "$OUT/$b.log" | tee -a "$OUT/summary.txt"
  find benchmarks/results -name "$b-cuda-*" -newer "$OUT/device.txt" -exec cp {} "$OUT/" \; 2>/dev/null
done
for s in $PARALLEL; do start_step $s; done
for s in $PARALLEL; do wait_step $s; done
{ tail -5 "$OUT/tests.log"; sed -n '/^| stage/,$p' "$OUT/run.log"; cat "$OUT/ptxas.log"; } | tee -a "$OUT/summary.txt"
log "done in $(( $(date +%s) - START ))s, status $status" | tee -a "$OUT/summary.txt"
tar czf "$OUT/results.tgz" --exclude=results.tgz --exclude='checkpoint.pt' -C "$OUT" . 2>/dev/null
[ "${GPU_QUICK_KEEP:-0}" = 1 ] || find "$OUT" -mindepth 1 ! -name results.tgz ! -name summary.txt -delete 2>/dev/null
echo
cat "$OUT/summary.txt"
exit $status
