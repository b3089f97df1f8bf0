#!/usr/bin/env bash
# One device call (H200) timing two builds of THIS tree that differ only in extra nvcc
# flags (a compile-time switch's A/B) or by a patch, from the repo root on the GPU machine:
#   OUT=$OUT FLAGS_B="-DSOME_SWITCH=1" BENCH="--dim 128 --n 4096 32768 --ratio 4 --no-bwd" \
#     PYTEST_K="consumer_turns" bash benchmarks/device/run_flags_ab_device.sh
# (NOTES v18's A/B of Q in registers in the forward ran this with a switch since removed.)
# builds A (FLAGS_A, default none) in place and B in a copy (/tmp/flags_b) side by side for
# sm_90a with ptxas -v (C75xx and spill lines counted), runs `pytest -m cuda $PYTEST_FILES -k
# "$PYTEST_K"` when PYTEST_K is set (and the SMOKES), then ROUNDS (default 3) rounds of bench_attention.py
# --no-flex $BENCH (several argument sets separated by ';'), A then B, each its own process from
# its own tree (past DEADLINE seconds,
# default 480, the rounds stop); BITWISE=1 compares the two builds' outputs bit for bit before the rounds.
# Logs under $OUT.
set -u
cd "$(dirname "$0")/../.."
source benchmarks/device/common.sh
A=$PWD B=/tmp/flags_b
tree() { [ "$1" = a ] && echo $A || echo $B; }  # the tree of build a or b
export CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(($(date +%s) - T0)) s]"; }
rm -rf build unigist/_C*.so $B && mkdir -p $B && cp -r csrc unigist setup.py pyproject.toml benchmarks tests $B/ 2>/dev/null
# PATCH_B: a patch (-p1) for B's copy: a candidate (B = the tree with it, CHECK=b), or the reverse
# of exactly the change under test (B = the tree before it, CHECK=a). `git diff -R -- csrc/` is
# that reverse only while the change is the tree's one uncommitted edit (NOTES v19 timed a B that
# had lost an earlier edit too).
if [ -n "${PATCH_B:-}" ]; then (cd $B && patch -p1 < $A/$PATCH_B > $OUT/patch_b.log 2>&1) || { echo "PATCH_B failed"; cat $OUT/patch_b.log; exit 1; }; fi
build() {  # dir flags log
  (cd $1 && MAX_JOBS=8 NVCC_APPEND_FLAGS="-Xptxas -v $2" timeout 300 python3 setup.py build_ext --inplace > $3 2>&1)
}
build $A "${FLAGS_A:-}" $OUT/build_a.log & build $B "${FLAGS_B:-}" $OUT/build_b.log & wait
for x in a b; do
  ls $(tree $x)/unigist/_C*.so > /dev/null 2>&1 || { echo "build $x failed"; grep -m5 error $OUT/build_$x.log; exit 1; }
  echo "$(el) built $x: C75xx $(grep -c 'C75[0-9][0-9]' $OUT/build_$x.log), spills: $(grep -oE '[0-9]+ bytes spill stores' $OUT/build_$x.log | sort | uniq -c | tr '\n' ' ')"
done
# The tests (and SMOKES, '|'-separated tests/cuda scripts under compute-sanitizer memcheck) run
# on build CHECK (a or b, default b: the build with the change, when A is the tree before it
# through FLAGS; with PATCH_B, B is the tree before and CHECK=a checks the change).
C=$(tree ${CHECK:-b})
if [ -n "${PYTEST_K:-}" ]; then
  (cd $C && PYTHONPATH=$C timeout ${PYTEST_TIMEOUT:-150} python3 -m pytest -m cuda ${PYTEST_FILES:-tests/test_cuda_attention.py} -q -x -p no:cacheprovider -k "$PYTEST_K" > $OUT/pytest.log 2>&1)
  echo "$(el) pytest (${CHECK:-b}): $(tail -1 $OUT/pytest.log)"; grep -E "^FAILED|^E " $OUT/pytest.log | head -5
fi
[ -n "${SMOKES:-}" ] && echo "memcheck on build ${CHECK:-b}:" && (cd $C && export PYTHONPATH=$C && memcheck_smokes "$OUT")
# BITWISE=1: are A's and B's kernels bitwise the same on fixed inputs (diag_bitwise.py)?
if [ -n "${BITWISE:-}" ]; then
  for x in a b; do (cd $(tree $x) && PYTHONPATH=$PWD python3 benchmarks/device/diag_bitwise.py save /tmp/bitwise_$x.pt > $OUT/bitwise_$x.log 2>&1); done
  echo "$(el) $(python3 benchmarks/device/diag_bitwise.py compare /tmp/bitwise_a.pt /tmp/bitwise_b.pt 2>&1 | head -6)"
fi
IFS=';' read -ra BENCHES <<< "$BENCH"
for round in $(seq 1 ${ROUNDS:-3}); do
  for j in "${!BENCHES[@]}"; do
    for x in a b; do
      [ $(($(date +%s) - T0)) -gt ${DEADLINE:-480} ] && break 3
      d=$(tree $x)
      l=$OUT/b_${j}_${x}_$round
      (cd $d && PYTHONPATH=$d timeout 120 python3 benchmarks/bench_attention.py --no-flex ${BENCHES[$j]} --out $l.md > $l.log 2>&1)
      echo "$(el) $x [${BENCHES[$j]}] r$round: $(bench_summary $l.log)"
    done
  done
done
