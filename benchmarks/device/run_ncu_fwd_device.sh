#!/usr/bin/env bash
# ncu of one wgmma kernel launch per setting, from the repo root on the GPU machine:
#   OUT=$OUT SETTINGS="UNIGIST_SM90_PINGPONG=0|UNIGIST_SM90_PINGPONG=fwd" ARGS="--n 32768" \
#     KERNEL=gist_attn_fwd_sm90 bash benchmarks/device/run_ncu_fwd_device.sh
# (the dK/dV passes: KERNEL=gist_attn_bwd_dkdv_sm90 ARGS="--n 32768 --bwd" SKIPS="0 1": the
# gist pass is its first launch, the dense pass its second)
# builds for sm_90a unless unigist/_C*.so exists, profiles the KERNEL's first launch (and, per SKIPS, later ones) in
# profile_fwd_device.py $ARGS (--set full, source counters) per '|'-separated setting and
# writes, per setting, the details page (details_<i>.txt) and a summary of the SASS stall
# samples (stalls_<i>.txt: by opcode, and the top instructions with their stall reasons).
set -u
cd "$(dirname "$0")/../.."
export CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu"; exit 1; }
T0=$(date +%s); el() { echo "[$(($(date +%s) - T0)) s]"; }
if ! ls unigist/_C*.so > /dev/null 2>&1; then
  MAX_JOBS=16 timeout 240 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { grep error $OUT/build.log | head; exit 1; }
  echo "$(el) built"
fi
IFS='|' read -ra SETS <<< "$SETTINGS"
i=0
for si in "${!SETS[@]}"; do for skip in ${SKIPS:-0}; do
  i=$((i + 1))
  env ${SETS[$si]} timeout 200 $NCU --clock-control none -k regex:${KERNEL:-gist_attn_fwd_sm90} -s $skip -c 1 --set full \
    --import-source yes -f -o $OUT/r_$i python3 benchmarks/device/profile_fwd_device.py ${ARGS:---n 32768} > $OUT/ncu_$i.log 2>&1
  echo "$(el) [${SETS[$si]}] launch $skip: ncu rc=$? -> details_$i.txt, stalls_$i.txt"
  $NCU -i $OUT/r_$i.ncu-rep --page details > $OUT/details_$i.txt 2>&1
  $NCU -i $OUT/r_$i.ncu-rep --page source --csv --print-source sass > $OUT/sass_$i.csv 2>&1
  python3 benchmarks/device/summarize_sass_stalls.py $OUT/sass_$i.csv > $OUT/stalls_$i.txt 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Hit|Issue Slots Busy|Executed Ipc A|Registers Per|Achieved Occupancy" $OUT/details_$i.txt | head -12
  rm -f $OUT/r_$i.ncu-rep $OUT/sass_$i.csv
done; done
