#!/usr/bin/env bash
# One device call (H200) timing several settings of the kernel-choice switches in ONE build,
# from the repo root on the GPU machine:
#   OUT=$OUT SETTINGS="A1=x A2=y|B1=z|..." BENCH="--dim 128 --n 4096 32768 --ratio 4" \
#     bash benchmarks/device/run_settings_device.sh
# builds for sm_90a, runs `pytest -m cuda $PYTEST_FILES -k "$PYTEST_K"` when either is set
# (PYTEST_FILES defaults to tests/test_cuda_attention.py), compute-sanitizer memcheck of the
# '|'-separated tests/cuda scripts in SMOKES, then two rounds of
# bench_attention.py --no-flex $BENCH per setting (each its own process; BENCH may hold several
# argument sets separated by ';'; past DEADLINE seconds, default 500, the rounds stop), one line
# per run.
# (run_env_ab_device.sh does two settings with memcheck and table rows.) Logs: $OUT/all.tgz.
set -u
cd "$(dirname "$0")/../.."
source benchmarks/device/common.sh
export CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; T0=$(date +%s); el() { echo "[$(($(date +%s) - T0)) s]"; }
rm -rf build unigist/_C*.so
MAX_JOBS=16 NVCC_APPEND_FLAGS="-Xptxas -v" timeout 240 python3 setup.py build_ext --inplace > $L/build.log 2>&1 || { grep error $L/build.log | head; exit 1; }
# ptxas reports serialized wgmma (C7510-C7520, "Potential Performance Loss") as info, not as a warning.
echo "$(el) built; ptxas C75xx (serialized wgmma): $(grep -c 'C75[0-9][0-9]' $L/build.log)"
if [ -n "${PYTEST_K:-}${PYTEST_FILES:-}" ]; then
  timeout ${PYTEST_TIMEOUT:-200} python3 -m pytest -m cuda ${PYTEST_FILES:-tests/test_cuda_attention.py} -q -x -p no:cacheprovider -k "${PYTEST_K:-}" > $L/pytest.log 2>&1
  echo "$(el) pytest: $(tail -1 $L/pytest.log)"; grep -E "^FAILED|^E " $L/pytest.log | head -5
fi
memcheck_smokes "$L"
IFS='|' read -ra SETS <<< "$SETTINGS"
IFS=';' read -ra BENCHES <<< "$BENCH"
for round in 1 2; do
  for j in "${!BENCHES[@]}"; do
    for i in "${!SETS[@]}"; do
      [ $(($(date +%s) - T0)) -gt ${DEADLINE:-500} ] && break 3
      b=$L/b_${j}_${i}_$round
      env ${SETS[$i]} timeout 120 python3 benchmarks/bench_attention.py --no-flex ${BENCHES[$j]} --out $b.md > $b.log 2>&1
      echo "$(el) [${SETS[$i]}] [${BENCHES[$j]}] r$round: $(bench_summary $b.log)"
    done
  done
done
tar -C $OUT -czf $OUT/all.tgz logs
