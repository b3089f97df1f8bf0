#!/usr/bin/env bash
# What produced benchmarks/results/generate.md: build, the CUDA tests of the HF
# integration / eviction op, and the generation benchmark, on the GPU machine.
#   bash benchmarks/device/run_generate_device.sh OUT_DIR
# If the full extension (with the CUDA attention kernels) does not build in time,
# a fallback build (CPU ops + CUDA eviction op) is used: generation only needs
# the eviction op and SDPA.
set -u
OUT=${1:-/tmp/unigist_out}
mkdir -p "$OUT"
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a TOKENIZERS_PARALLELISM=false
nvidia-smi -L > "$OUT/env.txt" 2>&1
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/env.txt" 2>&1

# BUILD=both (default): full build and fallback build side by side, full one used if it works;
# BUILD=fallback: only the fallback build (enough for the benchmark).
BUILD=${BUILD:-both}
FB=/tmp/unigist_fb/_C.so
if [ "$BUILD" = both ]; then
  ( timeout "${FULL_BUILD_TIMEOUT:-150}" python setup.py build_ext --inplace > "$OUT/build_full.log" 2>&1; echo $? > /tmp/unigist_full_rc ) &
  FULL=$!
fi
( mkdir -p /tmp/unigist_fb && python benchmarks/bench_generate.py --fallback-build --fallback-dest $FB > "$OUT/build_fallback.log" 2>&1; echo "rc=$?" >> "$OUT/build_fallback.log" ) &
FBP=$!
MODE=fallback
if [ "$BUILD" = both ]; then
  wait $FULL
  echo "rc=$(cat /tmp/unigist_full_rc)" >> "$OUT/build_full.log"
  if [ "$(cat /tmp/unigist_full_rc)" = 0 ] && python -c "import unigist, sys; sys.exit(0 if unigist.has_cuda_kernels() else 1)" >> "$OUT/build_full.log" 2>&1; then
    MODE=full
  fi
fi
wait $FBP  # let it finish either way, so it does not compete with the benchmark for the CPU
if [ "$MODE" = fallback ]; then
  cp $FB "unigist/_C$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
fi
echo "using the $MODE build" | tee -a "$OUT/env.txt"

if [ "${TESTS:-1}" = 1 ]; then
# CUDA tests of this part. With the fallback build tests/conftest.py would skip every
# `cuda` test (it asks for the attention kernels), so run them without it then.
if [ "$MODE" = full ]; then
  timeout 150 python -m pytest -q -m cuda tests/test_evict.py tests/test_generate.py tests/test_hf.py > "$OUT/pytest_cuda.log" 2>&1
else
  mkdir -p /tmp/ugplug && cat > /tmp/ugplug/ugseed.py <<'EOF'
import os, pytest, torch
@pytest.fixture
def seed():
    v = int.from_bytes(os.urandom(4), "little"); torch.manual_seed(v); return v
EOF
  PYTHONPATH=/tmp/ugplug:tests timeout 150 python -m pytest -q --noconftest -p ugseed -m cuda \
    tests/test_evict.py tests/test_generate.py tests/test_hf.py > "$OUT/pytest_cuda.log" 2>&1
fi
echo "pytest rc=$?" >> "$OUT/pytest_cuda.log"
fi

timeout "${BENCH_TIMEOUT:-300}" python benchmarks/bench_generate.py --out "$OUT/generate.md" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
tail -n 30 "$OUT"/pytest_cuda.log 2>/dev/null; grep -v "^\s*$" "$OUT/bench.log" | tail -n 120
