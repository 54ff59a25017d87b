export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 230 python3 .gpu_data/probe_s6b.py $OUT/probe_s6b.json > $OUT/probe_s6b.log 2>&1; el "probe rc=$?"
grep -v "^[WI][0-9]" $OUT/probe_s6b.log | tail -20
