#!/usr/bin/env bash
# The prepared command for a lent GPU machine (`make gpu-check`). It uses that machine's own
# python3 (no .venv there), builds in place for Hopper, then runs the CUDA tests, compute-sanitizer
# and the op benchmark. Each step has its own time limit and a failed step does not stop the
# later ones, so one run returns everything it could measure. Output goes to $OUT (or
# gpu-check-out/): gpu_check.log, one log per sanitizer, and the benchmark's op.md/op.csv.
#
#   GPU_CHECK_COMPILE=0   skip the torch.compile baseline (it costs about a minute on a cold cache)
set -uo pipefail
out=${OUT:-gpu-check-out}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, remember a failure
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

step device 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step versions 60 python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
step build 300 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . || { echo "build failed"; exit 1; }
if ! step op-tests 240 python3 -m pytest -q -rs -p no:cacheprovider --durations=8 tests/op; then
  # A crash ends a serial run early: get the native stack of the crash, then every test's verdict
  # from xdist workers (a crashed worker is replaced and its test reported as failed).
  command -v cuda-gdb >/dev/null && step crash-stack 90 cuda-gdb -q -batch -ex run -ex bt \
    --args python3 -m pytest -q -x -p no:cacheprovider tests/op
  step op-tests-xdist 120 python3 -m pytest -q -rfEs -p no:cacheprovider -n 4 tests/op
fi
compile_flag=(--compile-sizes 1024x16)
[ "${GPU_CHECK_COMPILE:-1}" = 0 ] && compile_flag=(--no-compile)
step bench 240 python3 benchmarks/bench_op.py --device cuda --loop-ref-max-groups 0 \
  "${compile_flag[@]}" --out-dir "$out"
# Every CUDA test under memcheck; racecheck (shared memory: the CUB block scans, reductions and
# the keyed update's block sort) over the tests that run those kernels, as it is slow. Not the
# launch count, whose profiler (CUPTI) the sanitizers do not host.
cuda_tests=(tests/op/test_op_cuda.py)
[ -f tests/op/test_op_keyed.py ] && cuda_tests+=(tests/op/test_op_keyed.py)
step memcheck 180 compute-sanitizer --tool memcheck --error-exitcode 1 --log-file "$out/memcheck.log" \
  python3 -m pytest -q -p no:cacheprovider -k "cuda and not launches" "${cuda_tests[@]}"
step racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 1 \
  --log-file "$out/racecheck.log" python3 -m pytest -q -p no:cacheprovider \
  -k "cuda and (history or step or keyed) and not launches" "${cuda_tests[@]}"
echo "gpu-check: $([ $status -eq 0 ] && echo all steps passed || echo a step failed)" | tee -a "$log"
exit $status
