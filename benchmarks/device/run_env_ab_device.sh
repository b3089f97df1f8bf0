#!/usr/bin/env bash
# One device call (H200) comparing two settings of kernel-choice environment
# variables (switches read by the CUDA entry points) in ONE build of this tree,
# from the repo root on the GPU machine:
#   OUT=$OUT bash benchmarks/device/run_env_ab_device.sh "A" "B" [bench_attention.py args...]
# where A and B are space-separated VAR=value lists, e.g.
#   ... "UNIGIST_SM90_FWD_CONSUMERS=2" "UNIGIST_SM90_FWD_CONSUMERS=3" --dim 64 --n 4096 8192 --ratio 4
# 1. builds this tree for sm_90a (ptxas -v in build.log);
# 2. with B set: pytest -m cuda on the attention tests (tests/test_cuda_*.py), and
#    compute-sanitizer memcheck of smoke_bwd quick and smoke_cache;
# 3. bench_attention.py (--no-flex, the args given) with A, B, A, B, each in its
#    own process, and the medians of the two rounds side by side.
# DIAG_PATCH=<patch> builds a patched copy in parallel and, at the end, times the
# forward (and with DIAG_BWD=1 forward+backward) of both trees on DIAG_BENCH
# (';'-separated bench_attention.py args).
# ROWS: ';'-separated bench_attention.py argument lists, each run once with B (ROWS_WITH=faster:
# with the setting whose fwd+bwd was faster in the rounds) and --append (the rows of
# benchmarks/results/attention.md it measures are replaced; the table is copied to the logs).
# PYTEST_FILES: what pytest -m cuda runs (default tests/test_cuda_*.py), PYTEST_S its timeout;
# SMOKES: '|'-separated tests/cuda scripts run under memcheck (default "smoke_bwd.py quick|smoke_cache.py").
# PYTEST_K: a pytest -k expression (default: every test); SKIP_TESTS=1: only benchmark. Steps have timeouts; benchmark rounds are
# skipped past DEADLINE seconds (default 430). Everything is logged under $OUT
# and packed into $OUT/all.tgz (the device returns few files).
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
A=$1 B=$2
shift 2
OUT=${OUT:-/tmp/unigist_env_ab}
mkdir -p "$OUT/logs"
L=$OUT/logs
export CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s]"; }
pack() { tar -C "$OUT" -czf "$OUT/all.tgz" logs; }
trap 'cp benchmarks/results/attention.md* "$L/" 2>/dev/null; pack' EXIT
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__)'

rm -rf build unigist/_C*.so
JOBS=16
if [ -n "${DIAG_PATCH:-}" ]; then
  # A second build with a diagnostic patch (benchmarks/experiments/), in parallel.
  JOBS=8
  rm -rf /tmp/diag && mkdir -p /tmp/diag && tar -c --exclude=./build . | tar -x -C /tmp/diag
  (cd /tmp/diag && { git apply "$DIAG_PATCH" || patch -p1 < "$DIAG_PATCH"; } && MAX_JOBS=8 timeout 300 python3 setup.py build_ext --inplace \
     > "$L/build_diag.log" 2>&1; echo $? > "$L/rc_diag") &
  DIAG_BUILD=$!
fi
MAX_JOBS=$JOBS NVCC_APPEND_FLAGS="-Xptxas -v" timeout 240 python3 setup.py build_ext --inplace > "$L/build.log" 2>&1
rc=$?
echo "$(el) built: rc=$rc"
if [ $rc != 0 ]; then grep -E "error" "$L/build.log" | head -10; exit 1; fi
grep -A2 "Compiling entry function '\S*gist_attn_fwd_sm90" "$L/build.log" | grep -E "spill|Used" | sort | uniq -c | head

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  env $B timeout "${PYTEST_S:-240}" python3 -m pytest -m cuda ${PYTEST_FILES:-tests/test_cuda_*.py} -q -x -p no:cacheprovider \
    -k "${PYTEST_K:-}" > "$L/pytest_B.log" 2>&1
  echo "$(el) pytest -m cuda ${PYTEST_FILES:-tests/test_cuda_*.py} with $B: $(grep -E "passed|failed|error" "$L/pytest_B.log" | tail -1)"
  grep -E "^FAILED|^ERROR" "$L/pytest_B.log" | cut -c1-200 | head -5
  IFS='|' read -ra SMOKES <<< "${SMOKES-smoke_bwd.py quick|smoke_cache.py}"  # SMOKES= : no memcheck
  for smoke in "${SMOKES[@]}"; do
    env $B timeout 120 compute-sanitizer --tool memcheck --print-limit 5 python3 tests/cuda/$smoke \
      > "$L/memcheck_${smoke%%.py*}.log" 2>&1
    echo "$(el) memcheck $smoke ($B): rc=$? $(grep -E "ERROR SUMMARY" "$L/memcheck_${smoke%%.py*}.log" | tail -1)"
  done
fi

for round in $(seq 1 "${ROUNDS:-2}"); do  # ROUNDS=0: no A/B rounds
  for name in A B; do
    if [ $(($(date +%s) - T0)) -gt "${DEADLINE:-430}" ]; then echo "$(el) past DEADLINE: skipped"; break 2; fi
    if [ $name = A ]; then setting=$A; else setting=$B; fi
    env $setting timeout 120 python3 benchmarks/bench_attention.py --no-flex "$@" \
      --out "$L/attn_${name}_$round.md" > "$L/attn_${name}_$round.log" 2>&1
    echo "$(el) bench $name ($setting) round $round: rc=$?"
  done
done

python3 - "$L" <<'EOF'
import glob, re, statistics, sys
logs, a, b = sys.argv[1], "A", "B"
rows = {}
for val in (a, b):
    for path in sorted(glob.glob(f"{logs}/attn_{val}_*.log")):
        for line in open(path):
            m = re.search(r"N=\s*(\d+) r=(\d+).*unigist fwd ([\d.]+) ms.*sdpa ([\d.]+).*fwd\+bwd unigist ([\d.]+) sdpa ([\d.]+)", line)
            if m:
                for name, ug, sd in (("fwd", m[3], m[4]), ("fwd+bwd", m[5], m[6])):
                    r = rows.setdefault(f"N={m[1]} r={m[2]} {name}", {})
                    r.setdefault(val, []).append((float(ug), float(sd)))
print(f"{'shape':24s} {'ms ' + a:>10s} {'ms ' + b:>10s} {b + '/' + a:>8s} {'SDPA/' + a:>8s} {'SDPA/' + b:>8s}")
total = {a: 0.0, b: 0.0}
for key, d in rows.items():
    for val in (a, b):
        if "fwd+bwd" in key and d.get(val):
            total[val] += statistics.median(x for x, _ in d[val])
    ua = statistics.median(x for x, _ in d.get(a, [(float('nan'), 1)]))
    ub = statistics.median(x for x, _ in d.get(b, [(float('nan'), 1)]))
    sa = statistics.median(y for _, y in d.get(a, [(1, float('nan'))]))
    sb = statistics.median(y for _, y in d.get(b, [(1, float('nan'))]))
    print(f"{key:24s} {ua:10.3f} {ub:10.3f} {ub / ua:8.3f} {sa / ua:8.2f} {sb / ub:8.2f}")
# The faster setting by total fwd+bwd time (B when there were no rounds), for ROWS_WITH=faster.
open(f"{logs}/faster", "w").write(a if 0 < total[a] < total[b] else b)
EOF
if [ -n "${ROWS:-}" ]; then
  IFS=';' read -ra RS <<< "$ROWS"
  for args in "${RS[@]}"; do
    if [ $(($(date +%s) - T0)) -gt "${DEADLINE:-430}" ]; then echo "$(el) past DEADLINE: skipped [$args]"; continue; fi
    setting=$B
    [ "${ROWS_WITH:-B}" = faster ] && [ "$(cat "$L/faster")" = A ] && setting=$A
    env $setting timeout 150 python3 benchmarks/bench_attention.py --no-flex --append $args >> "$L/rows.log" 2>&1
    echo "$(el) rows [$args] with $setting: rc=$?"
  done
  grep -E "^N=" "$L/rows.log" | cut -c1-160
fi
if [ -n "${DIAG_PATCH:-}" ]; then
  wait $DIAG_BUILD
  echo "$(el) diag build ($DIAG_PATCH): rc=$(cat "$L/rc_diag")"
  # DIAG_BENCH: ';'-separated bench_attention.py argument lists, each run (forward only) on this
  # tree and on the patched one
  IFS=';' read -ra DB <<< "${DIAG_BENCH:---dim 128 --n 32768 --ratio 4}"
  NOBWD=--no-bwd
  [ "${DIAG_BWD:-0}" = 1 ] && NOBWD=
  i=0
  for args in "${DB[@]}"; do
    i=$((i + 1))
    for tree in "$ROOT" /tmp/diag; do
      name=$([ "$tree" = "$ROOT" ] && echo main || echo diag)
      (cd "$tree" && env $B PYTHONPATH=$tree timeout 100 python3 benchmarks/bench_attention.py --no-flex $NOBWD $args \
         --out "$L/diag_${name}_$i.md" > "$L/diag_${name}_$i.log" 2>&1)
      echo "$(el) $name [$args]: $(grep -oE "N=.*sdpa [0-9.]+|fwd\+bwd unigist [0-9.]+ sdpa [0-9.]+" "$L/diag_${name}_$i.log" | tr '\n' ';')"
    done
  done
fi
echo "$(el) done"
