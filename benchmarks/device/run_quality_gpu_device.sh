#!/usr/bin/env bash
# The GPU quality study (benchmarks/quality_gpu) in two device calls of < 10 minutes each:
#   A [args]: size the training from a throughput probe of every variant, train full attention
#             (SDPA), evaluate it as is / StreamingLLM / SnapKV, then fine-tune a copy with
#             UniGist r=4 for the same steps and evaluate it through unigist.generate
#   B --steps N [args]: window-only control, UniGist r=4 and r=8 from scratch, with call A's steps
#             (N = "steps" of A's plan.json, printed as STEPS=N)
#   quick A|B [args]: the same at tiny sizes (CPU dry run; no build without CUDA)
# Builds the extension first when there is no CUDA build in unigist/. Per-job JSONs, plan.json
# and the logs go to $OUT; checkpoints to /tmp/qgpu (reused by a call that finds them).
# Usage on the GPU machine, from the repo root:
#   OUT=/some/dir bash benchmarks/device/run_quality_gpu_device.sh A
#   OUT=/some/dir bash benchmarks/device/run_quality_gpu_device.sh B --steps 700
# Then here: python -m benchmarks.quality_gpu.report --results DIR_A DIR_B
set -u
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-565}  # seconds this script may take, build included
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
cd "$(dirname "$0")/../.." && mkdir -p "${OUT:=/tmp/unigist_out}"
export CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
quick=
if [ "${1:-}" = quick ]; then quick=--quick; shift; fi
phase=${1:-A}
shift || true
case "$phase" in
  A) variants="full ft_gist_r4_prev" ;;
  B) variants="window gist_r4_prev gist_r8_prev"
     case " $* " in *" --steps "*) ;; *) echo "phase B needs --steps N (call A's STEPS=N)"; exit 2 ;; esac ;;
  *) echo "phase must be A or B, got $phase"; exit 2 ;;
esac
has_cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$has_cuda" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  if ! python3 -c "import torch, unigist.ops as o; assert o.kernel_supports('cuda', torch.bfloat16, 64)" 2>/dev/null; then
    python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -20; exit 1; }
    echo "built in $(( $(date +%s) - T0 )) s"
  fi
  python3 -c "import torch, unigist.ops as o; assert o.kernel_supports('cuda', torch.bfloat16, 64), 'no CUDA kernel'" || exit 1
else
  echo "no CUDA: skipping the build, running on CPU"
fi
lim=$(left)
echo "== phase $phase $quick ($variants) $*, $lim s left"
# the run stops starting evaluation samples 20 s before the limit; timeout is the backstop
timeout "$lim" python3 -m benchmarks.quality_gpu.run $quick --variants $variants --out "$OUT" \
  --time-limit $(( lim - 20 )) "$@" > "$OUT/run_$phase.log" 2>&1
rc=$?
grep -E "probe|STEPS=|steps in|eval|reused|loaded|done in|Error|error" "$OUT/run_$phase.log" | cut -c1-220
[ $rc -ne 0 ] && { echo "run exited $rc; last lines:"; tail -15 "$OUT/run_$phase.log"; }
ls "$OUT"
echo "done in $(( $(date +%s) - T0 )) s (rc $rc)"
exit $rc
