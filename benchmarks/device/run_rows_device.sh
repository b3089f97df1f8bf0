#!/usr/bin/env bash
# One device call (H200): build this tree (sm_90a), `pytest -m cuda tests`, compute-sanitizer
# memcheck of the '|'-separated tests/cuda scripts in SMOKES (if set), then rerun the
# SDPA-only rows of benchmarks/results/attention.md (no Flex columns: D=128 MHA at
# N 4k/8k/32k r 4/8; D=64 32/8 heads at N 4k/8k, windows 1024 and 256, bhnd and HF layouts),
# appended in place (bench_attention.py --append replaces the rows it measures).
# From the repo root on the GPU machine:  OUT=$OUT bash benchmarks/device/run_rows_device.sh
# $OUT/all.tgz holds the logs and the updated table (the device returns few files).
set -u
cd "$(dirname "$0")/../.."
source benchmarks/device/common.sh
OUT=${OUT:-/tmp/unigist_rows}
L=$OUT/logs
mkdir -p "$L"
export CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s]"; }
trap 'cp benchmarks/results/attention.md* "$L/" 2>/dev/null; tar -C "$OUT" -czf "$OUT/all.tgz" logs' EXIT
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
rm -rf build unigist/_C*.so
MAX_JOBS=16 timeout 240 python3 setup.py build_ext --inplace > "$L/build.log" 2>&1 || {
  grep -E "error" "$L/build.log" | head; exit 1; }
echo "$(el) built"
timeout "${PYTEST_S:-220}" python3 -m pytest -m cuda tests -q -x -p no:cacheprovider > "$L/pytest.log" 2>&1
echo "$(el) pytest -m cuda tests: rc=$? $(grep -E "passed|failed|error" "$L/pytest.log" | tail -1)"
grep -E "^FAILED|^ERROR" "$L/pytest.log" | cut -c1-200 | head -5
memcheck_smokes "$L"
row() {
  [ $(($(date +%s) - T0)) -gt "${DEADLINE:-480}" ] && { echo "$(el) past DEADLINE: skipped $*"; return; }
  timeout 150 python3 benchmarks/bench_attention.py --no-flex --append "$@" >> "$L/bench.log" 2>&1
  echo "$(el) rows [$*]: rc=$?"
}
row --n 4096 8192 32768 --ratio 4 8
for layout in hf bhnd; do
  for w in 1024 256; do
    row --n 4096 8192 --ratio 4 --heads 32 --kv-heads 8 --dim 64 --window $w --layout $layout
  done
done
grep -E "^N=" "$L/bench.log" | cut -c1-150
echo "$(el) done"
