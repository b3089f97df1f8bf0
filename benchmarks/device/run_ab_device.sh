#!/usr/bin/env bash
# One device call (H200) checking that this tree behaves and runs as a base commit
# does (a refactor's A/B), from the repo root on the GPU machine:
#   OUT=$OUT bash benchmarks/device/run_ab_device.sh            # base 4cb08b7
#   BASE_REV=<commit> OUT=$OUT bash benchmarks/device/run_ab_device.sh
#   BASE_TREE=<dir> OUT=$OUT bash ...   # no .git there: a copy of the base tree made beforehand
# 1. builds this tree (in place) and the base commit (git archive into /tmp/ab_base)
#    for sm_90a with ptxas -v, and compares the kernels' registers / spills / smem;
# 2. pytest -m cuda and compute-sanitizer memcheck (smoke_bwd quick, smoke_cache)
#    on this tree (while the base may still be building);
# 3. benchmarks, base / new / base / new in separate processes, each from its own
#    tree: bench_attention.py at 32k and 4k (r=4, fwd and fwd+bwd) and
#    bench_cache_cuda.py (32k context: decode step, 4096-query prefill chunk);
#    a side-by-side of the medians at the end.
# Every step has a timeout, and benchmark rounds are skipped past DEADLINE seconds
# (default 420), so that the whole run stays under 9 minutes. Logs under $OUT.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/unigist_ab}
BASE_REV=${BASE_REV:-4cb08b7}
BASE=/tmp/ab_base
mkdir -p "$OUT"
export CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s]"; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader

if [ -n "${BASE_TREE:-}" ]; then
  # the device's copy has no .git: the caller copies the base tree before patching this one
  BASE=$BASE_TREE
  [ -f "$BASE/setup.py" ] || { echo "BASE_TREE=$BASE holds no setup.py"; exit 1; }
  rm -rf "$BASE"/build "$BASE"/unigist/_C*.so
else
  rm -rf "$BASE" && mkdir -p "$BASE"
  if ! git -C "$ROOT" archive "$BASE_REV" | tar -x -C "$BASE"; then
    echo "cannot export $BASE_REV from $ROOT (no .git? then copy the base tree and pass BASE_TREE)"
    exit 1
  fi
fi
rm -rf "$ROOT"/build "$ROOT"/unigist/_C*.so

build() {  # build <dir> <name> <jobs>
  (cd "$1" && MAX_JOBS=$3 NVCC_APPEND_FLAGS="-Xptxas -v" timeout 270 python3 setup.py build_ext --inplace \
    > "$OUT/build_$2.log" 2>&1)
  echo $? > "$OUT/rc_$2"
}
build "$ROOT" new 8 &
NEW_BUILD=$!
build "$BASE" base 8 &
BASE_BUILD=$!
wait $NEW_BUILD
echo "$(el) new built: rc=$(cat "$OUT/rc_new")"
if [ "$(cat "$OUT/rc_new")" != 0 ]; then grep -E "error" "$OUT/build_new.log" | head -10; exit 1; fi

echo "== new: $(cd /tmp && PYTHONPATH=$ROOT python3 -c 'import unigist; print(unigist.__file__)')"
(PYTHONPATH=$ROOT timeout 250 python3 -m pytest -m cuda tests -q -x -p no:cacheprovider > "$OUT/pytest_new.log" 2>&1
 echo "$(el) pytest -m cuda (new): $(grep -E "passed|failed|error" "$OUT/pytest_new.log" | tail -1)"
 grep -E "^FAILED|^ERROR" "$OUT/pytest_new.log" | cut -c1-200 | head -5) &
TESTPID=$!
for smoke in "smoke_bwd.py quick" "smoke_cache.py"; do
  PYTHONPATH=$ROOT timeout 120 compute-sanitizer --tool memcheck --print-limit 5 python3 tests/cuda/$smoke \
    > "$OUT/memcheck_${smoke%%.py*}.log" 2>&1
  rc=$?
  echo "$(el) memcheck $smoke: rc=$rc $(grep -E "ERROR SUMMARY" "$OUT/memcheck_${smoke%%.py*}.log" | tail -1)"
done
# In-place (strided) reads, where this tree has them (UNIGIST_CUDA_STRIDED=1).
if grep -q "def test_strided_inputs_read_in_place" tests/test_cuda_attention.py; then
  PYTHONPATH=$ROOT timeout 120 compute-sanitizer --tool memcheck --print-limit 5 python3 -m pytest -q -x -m cuda \
    -p no:cacheprovider tests/test_cuda_attention.py -k "strided and bfloat16 and hf" > "$OUT/memcheck_strided.log" 2>&1
  rc=$?
  echo "$(el) memcheck strided tests: rc=$rc $(grep -E "ERROR SUMMARY" "$OUT/memcheck_strided.log" | tail -1)" \
    "$(grep -E "passed|failed" "$OUT/memcheck_strided.log" | tail -1)"
fi
wait $TESTPID
wait $BASE_BUILD
echo "$(el) base built: rc=$(cat "$OUT/rc_base")"
if [ "$(cat "$OUT/rc_base")" != 0 ]; then grep -E "error" "$OUT/build_base.log" | head -10; exit 1; fi

# Registers / spills / smem of every sm_90a kernel in both builds.
python3 - "$OUT/build_base.log" "$OUT/build_new.log" <<'EOF'
import re, sys
def kernels(path):
    out, cur = {}, None
    for line in open(path, errors="replace"):
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_90a'", line)
        if m:  # anonymous namespaces are named after the file's path: drop that
            cur = re.sub(r"_GLOBAL__N__\w+?_(\d+_\w+?_cu_)", r"_GLOBAL__N__\1", m.group(1)); out[cur] = ["", ""]
            continue
        if cur and "spill stores" in line: out[cur][0] = " ".join(re.findall(r"\d+", line))
        if cur and "Used" in line: out[cur][1] = line.split("Used", 1)[1].strip(); cur = None
    return out
b, n = kernels(sys.argv[1]), kernels(sys.argv[2])
same = [k for k in b if k in n and b[k] == n[k]]
print(f"ptxas sm_90a: {len(same)} kernels identical (regs, stack/spill, smem), "
      f"{len([k for k in b if k not in n])} only in base, {len([k for k in n if k not in b])} only in new")
diff = [k for k in sorted(set(b) | set(n)) if k not in same]
for k in diff[:12]:
    print("  ", k[:80], "base", b.get(k), "new", n.get(k))
EOF

bench() {  # bench <name> <dir> <round>
  (cd "$2" && PYTHONPATH=$2 timeout 100 python3 benchmarks/bench_attention.py --no-flex --n 4096 32768 --ratio 4 \
     --out "$OUT/attn_$1_$3.md" > "$OUT/attn_$1_$3.log" 2>&1)
  (cd "$2" && PYTHONPATH=$2 timeout 80 python3 benchmarks/bench_cache_cuda.py --contexts 32768 --chunks 1,4096 \
     --shapes 32/8/128 --out "$OUT/cache_$1_$3.md" > "$OUT/cache_$1_$3.log" 2>&1)
  echo "$(el) bench $1 round $3 done"
}
bench_hf() {  # this tree on HF's transposed layout, copies (0) vs in-place reads (1)
  for mode in 0 1; do
    (PYTHONPATH=$ROOT UNIGIST_CUDA_STRIDED=$mode timeout 90 python3 benchmarks/bench_attention.py --no-flex \
       --layout hf --heads 32 --kv-heads 8 --dim 64 --window 1024 --n 4096 8192 --ratio 4 \
       --out "$OUT/attn_hf_strided$mode.md" > "$OUT/attn_hf_strided$mode.log" 2>&1)
    echo "$(el) bench hf layout, UNIGIST_CUDA_STRIDED=$mode: rc=$?"
    grep -E "^\| hf" "$OUT/attn_hf_strided$mode.md" 2>/dev/null | cut -d'|' -f6,8,11,12,15,16
  done
}
for round in 1 2; do
  if [ $(($(date +%s) - T0)) -gt "${DEADLINE:-420}" ]; then echo "$(el) past DEADLINE: round $round skipped"; break; fi
  bench base "$BASE" $round
  bench new "$ROOT" $round
  if [ $round = 1 ] && grep -q "def test_strided_inputs_read_in_place" tests/test_cuda_attention.py; then bench_hf; fi
done

python3 - "$OUT" <<'EOF'
import re, statistics, sys
out = sys.argv[1]
rows = {}
def add(key, name, val):
    rows.setdefault(key, {}).setdefault(name, []).append(val)
for name in ("base", "new"):
    for rnd in (1, 2):
        try:
            for line in open(f"{out}/attn_{name}_{rnd}.log"):
                m = re.search(r"N=\s*(\d+) r=(\d+).*unigist fwd ([\d.]+) ms.*fwd\+bwd unigist ([\d.]+)", line)
                if m:
                    add(f"attn N={m[1]} r={m[2]} fwd ms", name, float(m[3]))
                    add(f"attn N={m[1]} r={m[2]} fwd+bwd ms", name, float(m[4]))
            for line in open(f"{out}/cache_{name}_{rnd}.log"):
                m = re.search(r"seen=(\d+) nq=(\d+).*kernel ([\d.]+) us \(splits=1: ([\d.]+), mma.sync: ([\d.]+)\)", line)
                if m:
                    add(f"cache seen={m[1]} nq={m[2]} kernel us", name, float(m[3]))
                    add(f"cache seen={m[1]} nq={m[2]} splits=1 us", name, float(m[4]))
                    add(f"cache seen={m[1]} nq={m[2]} mma.sync us", name, float(m[5]))
        except OSError as e:
            print("missing", e.filename)
print(f"{'metric':36s} {'base (runs)':>20s} {'new (runs)':>20s} {'new/base':>8s}")
for key, d in rows.items():
    b, n = d.get("base", []), d.get("new", [])
    ratio = f"{statistics.median(n) / statistics.median(b):.3f}" if b and n else "-"
    fmt = lambda xs: "/".join(f"{x:.3f}" if x < 100 else f"{x:.1f}" for x in xs)
    print(f"{key:36s} {fmt(b):>20s} {fmt(n):>20s} {ratio:>8s}")
EOF
echo "$(el) done"
