#!/usr/bin/env bash
# One device call: GPU tests, optional tuning, then the layer benchmark; JSON/logs under $OUT,
# a short table last. Knobs (env): TESTS (pytest -k expression, "none" to skip), TUNE_ARGS
# (arguments of `lowbit tune`, empty to skip), BENCH_ARGS (arguments of `lowbit bench layers`),
# XDIST (pytest-xdist workers for the GPU tests: compilation dominates them), LOWBIT_COMMIT.
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LOWBIT_COMMIT=${LOWBIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}  # set it where the copy has no git
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -n "${PROBES:-}" ]; then  # ';'-separated argument lists of bench/probe_kernel.py
  IFS=';' read -ra probe_list <<< "$PROBES"
  for p in "${probe_list[@]}"; do
    timeout 120 python3 bench/probe_kernel.py $p > "$OUT/probe.log" 2>&1; rc=$?; tail -n 14 "$OUT/probe.log"
    [ $rc = 0 ] || exit 1  # a kernel that does not compile makes the rest of the session moot
  done
fi
if [ "${TESTS:-}" != "none" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu tests -n ${XDIST:-12} ${TESTS:+-k "$TESTS"} -p no:cacheprovider \
    > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests exit $?"; tail -n 15 "$OUT/gpu_tests.log"
fi
if [ -n "${TUNE_ARGS:-}" ]; then  # tuned entries go where the dispatcher reads them, and to $OUT
  timeout ${TUNE_TIMEOUT:-240} python3 -m lowbit.kernels.tune $TUNE_ARGS > "$OUT/tune.log" 2>&1
  echo "tune exit $?"; tail -n 40 "$OUT/tune.log"; cp lowbit/kernels/configs/*.json "$OUT/" 2>/dev/null
fi
timeout ${BENCH_TIMEOUT:-300} python3 -m lowbit.bench.layers ${BENCH_ARGS:-} --json "$OUT/layers.json" \
  --plot "$OUT/layers.png" 2>&1 | tee "$OUT/bench.log" | tail -n 40
