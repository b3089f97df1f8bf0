# Shared by the device scripts (source it from the repo root): memcheck of test scripts and
# the one-line summary of a bench_attention.py log.

# memcheck_smokes LOGDIR: compute-sanitizer memcheck of each '|'-separated tests/cuda script in
# $SMOKES (e.g. SMOKES="smoke_fwd.py|smoke_bwd.py"), run from the current directory, one log
# and one summary line each. Needs el() (elapsed time) from the calling script.
memcheck_smokes() {
  local smokes smoke log
  IFS='|' read -ra smokes <<< "${SMOKES:-}"
  for smoke in "${smokes[@]}"; do
    log="$1/memcheck_${smoke%%.py*}.log"
    timeout 120 compute-sanitizer --tool memcheck --print-limit 5 python3 tests/cuda/$smoke > "$log" 2>&1
    echo "$(el) memcheck $smoke: rc=$? $(grep -E "ERROR SUMMARY" "$log" | tail -1)"
  done
}

# bench_summary LOG: the shapes, forward and forward+backward times of a bench_attention.py log.
bench_summary() {
  grep -oE "N=\s*[0-9]+ r=[0-9]+|unigist fwd [0-9.]+|fwd\+bwd unigist [0-9.]+ sdpa [0-9.]+" "$1" | tr '\n' ' '
}
