#!/usr/bin/env bash
# One device call (H200) timing two builds of THIS tree that differ only in extra nvcc
# flags (a compile-time switch's A/B), from the repo root on the GPU machine:
#   OUT=$OUT FLAGS_B="-DSOME_SWITCH=1" BENCH="--dim 128 --n 4096 32768 --ratio 4 --no-bwd" \
#     PYTEST_K="consumer_turns" bash benchmarks/device/run_flags_ab_device.sh
# (NOTES v18's A/B of Q in registers in the forward ran this with a switch since removed.)
# builds A (FLAGS_A, default none) in place and B in a copy (/tmp/flags_b) side by side for
# sm_90a with ptxas -v (C75xx and spill lines counted), runs `pytest -m cuda $PYTEST_FILES -k
# "$PYTEST_K"` on B when PYTEST_K is set, then ROUNDS (default 3) rounds of bench_attention.py
# --no-flex $BENCH, A then B, each its own process from its own tree (past DEADLINE seconds,
# default 480, the rounds stop). Logs under $OUT.
set -u
cd "$(dirname "$0")/../.."
A=$PWD B=/tmp/flags_b
export CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(($(date +%s) - T0)) s]"; }
rm -rf build unigist/_C*.so $B && mkdir -p $B && cp -r csrc unigist setup.py pyproject.toml benchmarks tests $B/ 2>/dev/null
build() {  # dir flags log
  (cd $1 && MAX_JOBS=8 NVCC_APPEND_FLAGS="-Xptxas -v $2" timeout 300 python3 setup.py build_ext --inplace > $3 2>&1)
}
build $A "${FLAGS_A:-}" $OUT/build_a.log & build $B "${FLAGS_B:-}" $OUT/build_b.log & wait
for x in a b; do
  ls $([ $x = a ] && echo $A || echo $B)/unigist/_C*.so > /dev/null 2>&1 || { echo "build $x failed"; grep -m5 error $OUT/build_$x.log; exit 1; }
  echo "$(el) built $x: C75xx $(grep -c 'C75[0-9][0-9]' $OUT/build_$x.log), spills: $(grep -oE '[0-9]+ bytes spill stores' $OUT/build_$x.log | sort | uniq -c | tr '\n' ' ')"
done
if [ -n "${PYTEST_K:-}" ]; then
  (cd $B && PYTHONPATH=$B timeout ${PYTEST_TIMEOUT:-150} python3 -m pytest -m cuda ${PYTEST_FILES:-tests/test_cuda_attention.py} -q -x -p no:cacheprovider -k "$PYTEST_K" > $OUT/pytest_b.log 2>&1)
  echo "$(el) pytest (B): $(tail -1 $OUT/pytest_b.log)"; grep -E "^FAILED|^E " $OUT/pytest_b.log | head -5
fi
for round in $(seq 1 ${ROUNDS:-3}); do
  for x in a b; do
    [ $(($(date +%s) - T0)) -gt ${DEADLINE:-480} ] && break 2
    d=$([ $x = a ] && echo $A || echo $B)
    (cd $d && PYTHONPATH=$d timeout 120 python3 benchmarks/bench_attention.py --no-flex $BENCH --out $OUT/b_${x}_$round.md > $OUT/b_${x}_$round.log 2>&1)
    echo "$(el) $x r$round: $(grep -oE "N=\s*[0-9]+ r=[0-9]+|unigist fwd [0-9.]+|fwd\+bwd unigist [0-9.]+ sdpa [0-9.]+" $OUT/b_${x}_$round.log | tr '\n' ' ')"
  done
done
