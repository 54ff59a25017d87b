# Session 12 call 2: query-major Mosaic dK/dV+dq (FA3 layout) vs the key-major default.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
mkdir -p /tmp/mdump
MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=/tmp/mdump ONLY16K=1 NOPROF=1 timeout -s KILL 100 python3 .gpu_data/probe_s12a.py $OUT dump fixed_qm > $OUT/dump.log 2>&1; el "dump rc=$?"
(cd /tmp/mdump && ls > $OUT/mdump_list.txt && tar czf $OUT/mdump.tgz *.ptx *.ptxas 2>/dev/null); grep -h -A1 "Function properties" /tmp/mdump/*.ptxas | grep spill
timeout -s KILL 250 python3 .gpu_data/probe_s12a.py $OUT fixed fixed_default,fixed_qm,fixed_mf,fixed_qm_mf > $OUT/fixed.log 2>&1; el "fixed rc=$?"
ONLY16K=1 NOPROF=1 timeout -s KILL $(( 575 - $(date +%s) + t0 )) python3 .gpu_data/probe_s12a.py $OUT other fixed_qm_noov > $OUT/other.log 2>&1; el "other rc=$?"
for f in dump fixed other; do echo "== $f"; grep -E "^\||FAILED|rror|device kernels|^        " $OUT/$f.log | grep -v "^[WI][0-9]" | cut -c1-200 | head -70; done
