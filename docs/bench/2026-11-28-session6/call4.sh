export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 200 python3 .gpu_data/probe_s6c.py $OUT > $OUT/probe_s6c.log 2>&1; el "probe rc=$?"
rm -rf $OUT/trace_*/plugins/profile/*/*.xplane.pb
grep -v "^[WI][0-9]" $OUT/probe_s6c.log | tail -70
