#!/usr/bin/env bash
# One device call (H200) for CUDA-graph decoding in unigist.generate: build (sm_90a), the CUDA
# tests of generation and the HF glue, then benchmarks/bench_generate.py (HF generate with and
# without cuDNN SDPA; unigist.generate with CUDA graphs, the default, and without); PROFILE=1 first
# runs benchmarks/device/profile_decode_device.py, BENCH=0 skips the benchmark.
#   OUT=$OUT bash benchmarks/device/run_graph_device.sh        (BENCH_ARGS to change the bench)
# $OUT/all.tgz holds the logs and the table (the device returns few files).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/unigist_graph}
L=$OUT/logs
mkdir -p "$L"
export CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s)
el() { echo "[$(($(date +%s) - T0)) s]"; }
trap 'tar -C "$OUT" -czf "$OUT/all.tgz" logs' EXIT
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
if ! python3 -c "import unigist, sys; sys.exit(0 if unigist.has_cuda_kernels() else 1)" 2>/dev/null; then
  rm -rf build unigist/_C*.so
  MAX_JOBS=16 timeout 240 python3 setup.py build_ext --inplace > "$L/build.log" 2>&1 || {
    grep -E "error" "$L/build.log" | head; exit 1; }
fi
echo "$(el) built"
timeout "${PYTEST_S:-150}" python3 -m pytest -m cuda ${PYTEST_FILES:-tests/test_generate.py tests/test_hf.py tests/test_cache_channel.py} \
  -q -p no:cacheprovider > "$L/pytest.log" 2>&1
echo "$(el) pytest: rc=$? $(grep -E "passed|failed|error" "$L/pytest.log" | tail -1)"
grep -E "^FAILED|^ERROR|Error" "$L/pytest.log" | cut -c1-300 | head -12
if [ "${PROFILE:-0}" = 1 ]; then  # where a decode step's time goes (host phases, kernel table)
  timeout "${PROFILE_S:-200}" python3 benchmarks/device/profile_decode_device.py ${PROFILE_ARGS:-} > "$L/profile.log" 2>&1
  echo "$(el) profile: rc=$?"
  grep -v -i warn "$L/profile.log" | cut -c1-220 | head -${PROFILE_LINES:-90}
fi
[ "${BENCH:-1}" = 1 ] || exit 0
timeout "${BENCH_S:-300}" python3 benchmarks/bench_generate.py --out "$L/generate.md" \
  ${BENCH_ARGS:---contexts 8192,32768 --kernel-prefill --new-tokens 64} > "$L/bench.log" 2>&1
echo "$(el) bench: rc=$?"
grep -E "^\[|^\|" "$L/bench.log" | cut -c1-400 | tail -20
