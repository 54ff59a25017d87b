export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 150 python3 .gpu_data/probe_s6d.py $OUT > $OUT/probe_s6d.log 2>&1; el "probe rc=$?"
rm -rf $OUT/trace_*/plugins/profile/*/*.xplane.pb $OUT/trace_*/plugins
grep -v "^[WI][0-9]" $OUT/probe_s6d.log | grep -v "^{" | tail -30
