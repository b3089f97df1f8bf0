#!/usr/bin/env bash
# One device run of the wgmma dQ kernel: build, smoke test, CUDA tests,
# per-kernel profile of fwd+bwd at 32k on both dQ paths, A/B benchmark,
# memcheck of a small case (mode "test"); or build + A/B benchmark + profiles (mode "bench").
# Usage on the GPU machine, from the repo root:
#   OUT=/some/dir bash benchmarks/run_dq_sm90_device.sh [test|bench|final]
# (final: tests, profiles, 32k bench and memcheck of the wgmma path only)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/unigist_out}
mkdir -p "$OUT"
mode=${1:-test}
export CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
echo "== build"
start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { grep -E "error|Error" "$OUT/build.log" | head -20; tail -20 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
profile() {  # kernel-time table of fwd+bwd, one line per kernel: total ms / calls
  timeout 60 python3 benchmarks/bench_attention.py --no-flex --n 32768 --ratio "$1" --profile 2>&1 \
    | grep -E "kernel|Self CUDA" | sed -E 's/ {2,}/ | /g' | cut -c1-170
}
if [ "$mode" = test ]; then
  echo "== smoke"
  timeout 60 python3 tests/cuda/smoke_bwd.py > "$OUT/smoke.log" 2>&1
  rc=$?
  cat "$OUT/smoke.log" | tail -22
  [ $rc = 124 ] && { echo "smoke test timed out (hang?)"; exit 1; }
  echo "== tests"
  timeout 150 python3 -m pytest -m cuda tests -q --maxfail=10 -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  grep -E "FAILED|Error|passed|failed" "$OUT/pytest.log" | head -20
  echo "== profile 32k r=4, wgmma dQ then mma.sync dQ"
  profile 4
  UNIGIST_FORCE_SM80=1 profile 4
  echo "== bench (wgmma dQ, then mma.sync dQ)"
  timeout 60 python3 benchmarks/bench_attention.py --no-flex --n 8192 32768 --ratio 4 8 --out "$OUT/bench_sm90.md" 2>&1 | grep "N=" | cut -c1-150
  UNIGIST_FORCE_SM80=1 timeout 60 python3 benchmarks/bench_attention.py --no-flex --n 8192 32768 --ratio 4 8 --out "$OUT/bench_sm80.md" 2>&1 | grep "N=" | cut -c1-150
  echo "== memcheck (wgmma dQ)"
  timeout 60 compute-sanitizer --tool memcheck --print-limit 5 python3 tests/cuda/smoke_bwd.py quick 2>&1 | grep -E "arch 90|ERROR|error|SUMMARY" | head -12
elif [ "$mode" = final ]; then
  echo "== tests"
  timeout 100 python3 -m pytest -m cuda tests -q --maxfail=10 -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  grep -E "FAILED|Error|passed|failed" "$OUT/pytest.log" | head -20
  for r in 4 8; do echo "== profile 32k r=$r"; profile $r | grep -E "unigist"; done
  echo "== bench"
  timeout 60 python3 benchmarks/bench_attention.py --no-flex --n 32768 --ratio 4 8 --out "$OUT/bench_sm90.md" 2>&1 | grep "N=" | cut -c1-150
  echo "== memcheck (wgmma dQ)"
  timeout 60 compute-sanitizer --tool memcheck --print-limit 5 python3 tests/cuda/smoke_bwd.py quick 2>&1 | grep -E "arch 90|ERROR|error|SUMMARY" | head -12
else
  echo "== bench (wgmma dQ, then mma.sync dQ)"
  timeout 100 python3 benchmarks/bench_attention.py --no-flex --n 8192 32768 --ratio 4 8 --out "$OUT/bench_sm90.md" 2>&1 | grep "N="
  UNIGIST_FORCE_SM80=1 timeout 100 python3 benchmarks/bench_attention.py --no-flex --n 8192 32768 --ratio 4 8 --out "$OUT/bench_sm80.md" 2>&1 | grep "N="
  for r in 4 8; do echo "== profile 32k r=$r (wgmma)"; profile $r; done
fi
