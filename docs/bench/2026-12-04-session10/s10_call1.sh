# Session 10 call 1: Mosaic dK/dV+dq at 128-row query blocks vs the default 64; strided breakdown.
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 220 python3 .gpu_data/probe_s10a.py $OUT base fixed_default,fixed_mf,strided_default > $OUT/a_base.log 2>&1; el "base rc=$?"
timeout -s KILL $(( 570 - $(date +%s) + t0 )) python3 .gpu_data/probe_s10a.py $OUT d128 fixed_dkv128,fixed_dkv128_mf,fixed_dkv128_noov > $OUT/a_d128.log 2>&1; el "d128 rc=$?"
for f in a_base a_d128; do echo "== $f"; grep -E "^\||FAILED|rror|device kernels|^  " $OUT/$f.log | grep -v "^[WI][0-9]" | cut -c1-200 | head -60; done
