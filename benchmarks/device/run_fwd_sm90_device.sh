#!/usr/bin/env bash
# One device run of the wgmma forward (see benchmarks/NOTES.md v6): wgmma
# conventions micro-test, build, smoke test, CUDA tests, forward A/B benchmark
# (wgmma vs mma.sync, same run). Usage on the GPU machine, from the repo root:
#   OUT=/some/dir bash benchmarks/device/run_fwd_sm90_device.sh [quick]
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/unigist_out}
mkdir -p "$OUT"
export CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
echo "== wgmma micro-test"
nvcc -ccbin /usr/bin/g++ -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I csrc tests/cuda/wgmma_check.cu -o "$OUT/wgmma_check" \
  && timeout 30 "$OUT/wgmma_check"
[ "${1:-}" = bench ] && skip_tests=1 || skip_tests=0
# A/B variants: VARIANTS="flags1;flags2" builds copies with extra nvcc flags
# (in the background, while the main build and tests run) and benchmarks them.
IFS=';' read -ra VARS <<< "${VARIANTS:-}"
for i in "${!VARS[@]}"; do
  d=/tmp/unigist_v$i
  rm -rf $d && mkdir $d && tar --exclude=./build -cf - . | tar -xf - -C $d
  (cd $d && rm -rf unigist/_C*.so && NVCC_APPEND_FLAGS="${VARS[$i]}" python3 setup.py build_ext --inplace > "$OUT/build_v$i.log" 2>&1) &
done
echo "== build"
start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
if [ $skip_tests = 0 ]; then
echo "== smoke"
timeout 60 python3 tests/cuda/smoke_fwd.py > "$OUT/smoke.log" 2>&1
rc=$?
tail -25 "$OUT/smoke.log"
[ $rc = 124 ] && { echo "smoke test timed out (hang?)"; exit 1; }
echo "== tests"
timeout 240 python3 -m pytest -m cuda tests -q --maxfail=10 -p no:cacheprovider 2>&1 | tail -4
fi
[ "${1:-}" = quick ] && exit 0
echo "== bench (wgmma, then mma.sync)"
timeout 120 python3 benchmarks/bench_attention.py --no-flex --no-bwd --n 8192 32768 --ratio 4 8 --out "$OUT/bench_sm90.md" 2>&1 | grep "N="
UNIGIST_FORCE_SM80=1 timeout 120 python3 benchmarks/bench_attention.py --no-flex --no-bwd --n 8192 32768 --ratio 4 8 --out "$OUT/bench_sm80.md" 2>&1 | grep "N="
wait
for i in "${!VARS[@]}"; do
  echo "== variant $i: ${VARS[$i]}"
  tail -1 "$OUT/build_v$i.log" | cut -c1-200
  PYTHONPATH=/tmp/unigist_v$i timeout 120 python3 benchmarks/bench_attention.py --no-flex --no-bwd --n 8192 32768 --ratio 4 8 --out "$OUT/bench_v$i.md" 2>&1 | grep "N="
done
