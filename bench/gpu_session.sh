#!/usr/bin/env bash
# One device call: GPU tests, optional tuning, layer benchmarks, optional end-to-end run. Writes few
# files under $OUT (the lent machine returns at most 8): session.log (every step's output), the
# JSON of each benchmark run, and the tuned table; draw the plots here afterwards with
# `python -m lowbit.bench.layers --replot X.json --plot X.png` (and `lowbit.bench.e2e --replot`).
# Knobs (env): PROBES (';'-separated argument lists of bench/probe_kernel.py), TESTS (pytest -k
# expression, "none" to skip), XDIST (pytest-xdist workers: compilation
# dominates the GPU tests), TUNE_ARGS (arguments of `lowbit tune`, empty to skip), BENCH_ARGS
# (';'-separated argument lists of `lowbit bench layers`, one run each, "none" to skip), E2E_ARGS
# (arguments of `lowbit bench e2e`, empty to skip), PROFILES (';'-separated argument lists of
# bench/profile_e2e.py: kernel time per decode step), *_TIMEOUT (seconds per step), LOWBIT_COMMIT (set
# it: the lent machine's copy has no git history of its own).
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LOWBIT_CACHE_DIR=${LOWBIT_CACHE_DIR:-$PWD/build/cubin}  # the 2:4 CUDA kernel: carry build/cubin, built here with python -m lowbit.kernels.sparse_cuda --arch 90
export LOWBIT_COMMIT=${LOWBIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}

step() {  # step NAME TIMEOUT COMMAND...: run, append its output to the log, print its tail
  local name=$1 limit=$2; shift 2
  echo "=== $name (commit $LOWBIT_COMMIT)" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name exit $rc" | tee -a "$LOG"
  return $rc
}

{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >> "$LOG" 2>&1
if [ -n "${PROBES:-}" ]; then  # ';'-separated argument lists of bench/probe_kernel.py (registers, spills, PTX)
  IFS=';' read -ra probe_list <<< "$PROBES"
  for p in "${probe_list[@]}"; do
    step "probe $p" 120 python3 bench/probe_kernel.py $p || exit 1  # a kernel that does not compile: stop here
  done
fi
if [ "${TESTS:-}" != "none" ]; then
  step "gpu tests" "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu tests -n "${XDIST:-12}" ${TESTS:+-k "$TESTS"} \
    -p no:cacheprovider
  grep -E "passed|failed" "$LOG" | tail -n 2
fi
if [ -n "${TUNE_ARGS:-}" ]; then  # tuned entries go where the dispatcher reads them (the tuner writes after each)
  step "tune" "${TUNE_TIMEOUT:-240}" python3 -m lowbit.kernels.tune $TUNE_ARGS
  cp lowbit/kernels/configs/*.json "$OUT/" 2>/dev/null
fi
if [ "${BENCH_ARGS:-}" != "none" ]; then
  IFS=';' read -ra bench_runs <<< "${BENCH_ARGS:-}"
  [ ${#bench_runs[@]} -eq 0 ] && bench_runs=("")
  for i in "${!bench_runs[@]}"; do
    step "layers $i: ${bench_runs[$i]}" "${BENCH_TIMEOUT:-300}" python3 -m lowbit.bench.layers ${bench_runs[$i]} \
      --json "$OUT/layers-$i.json"
    [ -f "$OUT/layers-$i.json" ] && python3 -m lowbit.bench.layers --replot "$OUT/layers-$i.json" | tail -n 14
  done
fi
if [ -n "${E2E_ARGS:-}" ]; then
  step "e2e" "${E2E_TIMEOUT:-300}" python3 -m lowbit.bench.e2e $E2E_ARGS --json "$OUT/e2e.json"
  tail -n 12 "$LOG"
fi
if [ -n "${PROFILES:-}" ]; then
  IFS=';' read -ra profile_list <<< "$PROFILES"
  for p in "${profile_list[@]}"; do
    step "profile $p" "${PROFILE_TIMEOUT:-240}" python3 bench/profile_e2e.py $p
  done
  sed -n '/^## /,/^===/p' "$LOG" | grep -v "^    " | tail -n 40
fi
