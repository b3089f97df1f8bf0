#!/usr/bin/env bash
# The full results/attention.md table on the GPU machine, in calls that fit the
# device tool's 10-minute limit (Flex (c) and (d) compile once per N and r):
#   build:  build (sm_90a), `pytest -m cuda`, memcheck of a small fwd+bwd, a
#           per-kernel profile at 32k r=4, then a new table of the 32k rows;
#           the built extension is copied to $OUT so later calls can carry it
#   table N...: rows for those N (the extension must be in unigist/ already),
#           appended to a copy of benchmarks/results/attention.md(.json), i.e.
#           the build call's table once committed there (bench_attention.py
#           --append refuses rows of another device, torch or layout)
# Usage on the GPU machine, from the repo root:
#   OUT=/some/dir bash benchmarks/device/run_table_device.sh build
#   OUT=/some/dir bash benchmarks/device/run_table_device.sh table 4096 8192 16384
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/unigist_out}
mkdir -p "$OUT"
T0=$(date +%s)
export CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
left() { echo $(( ${BUDGET_S:-560} - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
mode=${1:-build}
shift || true
if [ "$mode" = build ]; then
  NVCC_APPEND_FLAGS="-Xptxas -v" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || {
    grep -E "error" "$OUT/build.log" | head -20; exit 1; }
  echo "built in $(( $(date +%s) - T0 )) s; sm90 spills:" \
    "$(grep -A2 'Compiling entry function.*sm90.*sm_90a' "$OUT/build.log" | grep -oE '[0-9]+ bytes spill stores' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
  for so in unigist/_C*.so; do
    cp "$so" "$OUT/"; [ "$(stat -c %s "$so")" -gt 16000000 ] && strip --strip-debug "$OUT/$(basename "$so")"
    ls -l "$OUT/$(basename "$so")" | awk '{print $5, $9}'
  done
  timeout 240 python3 -m pytest -m cuda tests -q -x -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  grep -E "FAILED|Error|passed|failed" "$OUT/pytest.log" | cut -c1-200 | head -6
  echo "== memcheck (tests/cuda/smoke_bwd.py quick)"
  timeout 100 compute-sanitizer --tool memcheck --print-limit 5 python3 tests/cuda/smoke_bwd.py quick 2>&1 \
    | grep -E "ERROR|error|SUMMARY" | head -8
  echo "== profile 32k r=4 (total ms over 5 fwd+bwd)"
  timeout 60 python3 benchmarks/bench_attention.py --no-flex --n 32768 --ratio 4 --profile 2>&1 \
    | grep -E "unigist|kernel|Self CUDA" | sed -E 's/ {2,}/|/g' | awk -F'|' '{print $1, "|", $7, "|", $11}' | cut -c1-150
  set -- 32768
else
  cp benchmarks/results/attention.md benchmarks/results/attention.md.json "$OUT/"
fi
echo "== table N=$* ($(left) s left)"
timeout "$(left)" python3 benchmarks/bench_attention.py --n "$@" --append --out "$OUT/attention.md" 2>&1 \
  | grep -E "N=|Error|error|--append" | cut -c1-260
echo "done in $(( $(date +%s) - T0 )) s"
