#!/usr/bin/env bash
# Device runs of the wgmma backward (dQ and dK/dV kernels; written for
# csrc/cuda/sm90/bwd_dkdv_sm90.cu, whose ptxas report it prints), in two calls that
# fit the 10-minute limit (the second reuses the first's build):
#   test  (default): build (+ ptxas report of the new kernel), smoke test, CUDA
#         tests, memcheck of a small case (~6-7 min)
#   bench: build, per-kernel profile of fwd+bwd at 32k r=4/8 and A/B benchmark
#         at 8k/32k, wgmma backward vs UNIGIST_FORCE_SM80=1 (~5 min)
#   final: tests, profiles, 32k bench and memcheck of the wgmma path only
# Output kept short (the device tool returns the last 12,000 characters); full
# logs under $OUT. Usage on the GPU machine, from the repo root:
#   OUT=/some/dir bash benchmarks/device/run_dkdv_sm90_device.sh [test|bench|final]
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/unigist_out}
mkdir -p "$OUT"
mode=${1:-test}
export CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
echo "== build"
start=$(date +%s)
NVCC_APPEND_FLAGS="-Xptxas -v" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || {
  grep -E "error|Error" "$OUT/build.log" | head -20; tail -20 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
# registers / spills of the new kernel, and any wgmma serialization warning
grep -A3 "Compiling entry function.*dkdv_sm90.*sm_90a" "$OUT/build.log" | grep -E "spill|Used" | sort | uniq -c | head -4
grep -E "C75[0-9][0-9]" "$OUT/build.log" | cut -c1-160 | sort -u | head -4
profile() {  # kernel-time table of fwd+bwd, one line per kernel: total ms / calls
  timeout 60 python3 benchmarks/bench_attention.py --no-flex --n 32768 --ratio "$1" --profile 2>&1 \
    | grep -E "kernel|Self CUDA" | sed -E 's/ {2,}/ | /g' | cut -c1-170
}
memcheck() {
  timeout 90 compute-sanitizer --tool memcheck --print-limit 5 python3 tests/cuda/smoke_bwd.py quick 2>&1 \
    | grep -E "arch 90|ERROR|error|SUMMARY" | head -12
}
if [ "$mode" = test ]; then
  echo "== smoke"
  timeout 90 python3 tests/cuda/smoke_bwd.py > "$OUT/smoke.log" 2>&1
  rc=$?
  tail -24 "$OUT/smoke.log" | cut -c1-160
  [ $rc = 124 ] && { echo "smoke test timed out (hang?)"; exit 1; }
  echo "== tests"
  timeout 200 python3 -m pytest -m cuda tests -q --maxfail=10 -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  echo "rc $?"
  grep -E "FAILED|Error|passed|failed" "$OUT/pytest.log" | cut -c1-200 | head -20
  echo "== memcheck (wgmma path)"
  memcheck
elif [ "$mode" = bench ]; then
  for r in 4 8; do
    echo "== profile 32k r=$r, wgmma backward then mma.sync backward"
    profile $r
    UNIGIST_FORCE_SM80=1 profile $r | grep -E "dkdv|dq_|Self CUDA"
  done
  echo "== bench (wgmma, then UNIGIST_FORCE_SM80=1)"
  timeout 100 python3 benchmarks/bench_attention.py --no-flex --n 8192 32768 --ratio 4 8 --out "$OUT/bench_sm90.md" 2>&1 | grep "N=" | cut -c1-150
  UNIGIST_FORCE_SM80=1 timeout 100 python3 benchmarks/bench_attention.py --no-flex --n 8192 32768 --ratio 4 8 --out "$OUT/bench_sm80.md" 2>&1 | grep "N=" | cut -c1-150
elif [ "$mode" = final ]; then
  echo "== tests"
  timeout 200 python3 -m pytest -m cuda tests -q --maxfail=10 -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  grep -E "FAILED|Error|passed|failed" "$OUT/pytest.log" | cut -c1-200 | head -20
  for r in 4 8; do echo "== profile 32k r=$r"; profile $r | grep -E "unigist|Self CUDA"; done
  echo "== bench"
  timeout 90 python3 benchmarks/bench_attention.py --no-flex --n 32768 --ratio 4 8 --out "$OUT/bench_sm90.md" 2>&1 | grep "N=" | cut -c1-150
  echo "== memcheck (wgmma path)"
  memcheck
else
  echo "unknown mode $mode (test|bench|final)"; exit 2
fi
