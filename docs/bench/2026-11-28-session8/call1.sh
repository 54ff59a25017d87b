# Session 8 call 1: time the Mosaic dK/dV(+dq) kernel's scheduling knobs (probe A), then the GPU check of the defaults.
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 300 python3 .gpu_data/probe_s8a.py $OUT > $OUT/probe_s8a.log 2>&1; el "probe rc=$?"
timeout -s KILL 240 python3 scripts/bench_attention.py $OUT/chk.json --check-only --quick > $OUT/chk.log 2>&1; el "check rc=$?"
rm -rf $OUT/trace_*/plugins/profile/*/*.xplane.pb
grep -v "^[WI][0-9]" $OUT/probe_s8a.log | grep -v "^| " | tail -40 | cut -c1-300
grep -E "GPU check|FAILED" $OUT/chk.log | cut -c1-300 | head
grep -v "^[WI][0-9]" $OUT/probe_s8a.log | tail -10
