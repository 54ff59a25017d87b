# Session 7 call 2: GPU check of mosaic_summary_dq against the float32 reference, then probe B.
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 200 python3 scripts/bench_attention.py $OUT/chk.json --check-only --quick --mosaic-summary-dq > $OUT/chk.log 2>&1; el "check rc=$?"
timeout -s KILL 330 python3 .gpu_data/probe_dq_reductions.py $OUT > $OUT/probe_s7b.log 2>&1; el "probe rc=$?"
rm -rf $OUT/trace_*/plugins/profile/*/*.xplane.pb
grep -E "GPU check|FAILED|rror" $OUT/chk.log | cut -c1-300 | head -20
grep -v "^[WI][0-9]" $OUT/probe_s7b.log | grep -v "^| " | tail -80 | cut -c1-300
grep -v "^[WI][0-9]" $OUT/probe_s7b.log | tail -14
