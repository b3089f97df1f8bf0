#!/usr/bin/env bash
# One device call comparing kernel variants: source trees (this checkout, a git
# worktree carried along) and/or nvcc defines. Each variant is
# "name=dir[:nvcc defines]", e.g. from the repo root on the GPU machine:
#   OUT=/some/dir bash benchmarks/device/run_variants_device.sh \
#       "main=." "next=.sm90" "qreg=.sm90:-DUNIGIST_SM90_DQ_QREG=1"
# Builds every variant in parallel (copies under /tmp), runs `pytest -m cuda`
# on each variant named in TEST (default: all but the first, the baseline),
# then a per-kernel profile of each and two interleaved rounds of the 32k
# benchmark (so clock drift hits all alike). MEMCHECK=1 adds a compute-sanitizer
# memcheck of a small fwd+bwd on each tested variant; BENCH_ROUNDS (default 2)
# sets the bench rounds. Short output; logs under $OUT.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/unigist_out}
mkdir -p "$OUT"
[ $# -ge 1 ] || { echo "usage: $0 name=dir[:defines] ..."; exit 2; }
export CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
export MAX_JOBS=$(( 16 / $# > 2 ? 16 / $# : 2 ))
names=()
declare -A dir flags
for spec in "$@"; do
  name=${spec%%=*}; rest=${spec#*=}
  src=${rest%%:*}; fl=""; [[ $rest == *:* ]] && fl=${rest#*:}
  names+=("$name"); dir[$name]=/tmp/variant_$name; flags[$name]=$fl
  rm -rf "${dir[$name]}" && mkdir -p "${dir[$name]}"
  (cd "$ROOT/$src" && cp -r csrc unigist tests benchmarks setup.py pyproject.toml "${dir[$name]}/")
  rm -rf "${dir[$name]}"/build "${dir[$name]}"/unigist/_C*.so
done
TEST=${TEST:-${names[*]:1}}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
start=$(date +%s)
for n in "${names[@]}"; do
  (cd "${dir[$n]}" && NVCC_APPEND_FLAGS="-Xptxas -v ${flags[$n]}" python3 setup.py build_ext --inplace \
     > "$OUT/build_$n.log" 2>&1; echo $? > "$OUT/rc_$n") &
done
wait
echo "built in $(( $(date +%s) - start )) s"
for n in "${names[@]}"; do
  if [ "$(cat "$OUT/rc_$n")" != 0 ]; then echo "$n: build failed"; grep -E "error" "$OUT/build_$n.log" | head -10; exit 1; fi
  echo "$n (${flags[$n]:-no defines}): sm90 spills $(grep -A2 'Compiling entry function.*sm90.*sm_90a' "$OUT/build_$n.log" \
    | grep -oE '[0-9]+ bytes spill stores' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
done
for n in $TEST; do
  echo "== tests $n"
  (cd "${dir[$n]}" && PYTHONPATH=${dir[$n]} timeout 200 python3 -m pytest -m cuda tests -q -x -p no:cacheprovider \
     > "$OUT/pytest_$n.log" 2>&1)
  grep -E "FAILED|Error|passed|failed" "$OUT/pytest_$n.log" | cut -c1-200 | head -6
  if [ "${MEMCHECK:-0}" = 1 ]; then
    echo "== memcheck $n (tests/cuda/smoke_bwd.py quick)"
    (cd "${dir[$n]}" && PYTHONPATH=${dir[$n]} timeout 120 compute-sanitizer --tool memcheck --print-limit 5 \
       python3 tests/cuda/smoke_bwd.py quick 2>&1 | grep -E "ERROR|error|SUMMARY" | head -8)
  fi
done
for n in "${names[@]}"; do
  echo "== profile $n (32k r=4, ms per fwd+bwd = total / calls)"
  (cd "${dir[$n]}" && PYTHONPATH=${dir[$n]} timeout 60 python3 benchmarks/bench_attention.py --no-flex --n 32768 --ratio 4 --profile 2>&1 \
     | grep -E "unigist|Self CUDA" | sed -E 's/ {2,}/|/g' | awk -F'|' '{print $1, "|", $7, "|", $11}' | cut -c1-150)
done
for round in $(seq 1 "${BENCH_ROUNDS:-2}"); do
  for n in "${names[@]}"; do
    echo "== bench $n ($round)"
    (cd "${dir[$n]}" && PYTHONPATH=${dir[$n]} timeout 100 python3 benchmarks/bench_attention.py --no-flex --n 32768 --ratio 4 8 \
       --out "$OUT/bench_${n}_$round.md" 2>&1 | grep "N=" | sed -E 's/flex None.*\| fwd\+bwd/| fwd+bwd/; s/ flex None.*//' | cut -c1-150)
  done
done
