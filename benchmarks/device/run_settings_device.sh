#!/usr/bin/env bash
# One device call (H200) timing several settings of the kernel-choice switches in ONE build,
# from the repo root on the GPU machine:
#   OUT=$OUT SETTINGS="A1=x A2=y|B1=z|..." BENCH="--dim 128 --n 4096 32768 --ratio 4" \
#     bash benchmarks/device/run_settings_device.sh
# builds for sm_90a, runs `pytest -m cuda tests/test_cuda_attention.py -k "$PYTEST_K"` when
# PYTEST_K is set, then two rounds of bench_attention.py --no-flex $BENCH per setting (each its
# own process; past DEADLINE seconds, default 500, the rounds stop), one line per run.
# (run_env_ab_device.sh does two settings with memcheck and table rows.) Logs: $OUT/all.tgz.
set -u
cd "$(dirname "$0")/../.."
export CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; T0=$(date +%s); el() { echo "[$(($(date +%s) - T0)) s]"; }
rm -rf build unigist/_C*.so
MAX_JOBS=16 timeout 240 python3 setup.py build_ext --inplace > $L/build.log 2>&1 || { grep error $L/build.log | head; exit 1; }
echo "$(el) built"
if [ -n "${PYTEST_K:-}" ]; then
  timeout 200 python3 -m pytest -m cuda tests/test_cuda_attention.py -q -x -p no:cacheprovider -k "$PYTEST_K" > $L/pytest.log 2>&1
  echo "$(el) pytest: $(tail -1 $L/pytest.log)"; grep -E "^FAILED|^E " $L/pytest.log | head -5
fi
IFS='|' read -ra SETS <<< "$SETTINGS"
for round in 1 2; do
  for i in "${!SETS[@]}"; do
    [ $(($(date +%s) - T0)) -gt ${DEADLINE:-500} ] && break 2
    env ${SETS[$i]} timeout 120 python3 benchmarks/bench_attention.py --no-flex $BENCH --out $L/b_${i}_$round.md > $L/b_${i}_$round.log 2>&1
    echo "$(el) [${SETS[$i]}] r$round: $(grep -oE "N=\s*[0-9]+ r=[0-9]+|unigist fwd [0-9.]+|fwd\+bwd unigist [0-9.]+ sdpa [0-9.]+" $L/b_${i}_$round.log | tr '\n' ' ')"
  done
done
tar -C $OUT -czf $OUT/all.tgz logs
