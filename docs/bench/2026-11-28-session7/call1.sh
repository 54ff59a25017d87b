# Session 7 call 1: GPU check + timing of mosaic_summary_dkv (bench), then probe A (mdkv, mdq breakdown and errors).
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 270 python3 scripts/bench_attention.py $OUT/mdkv.json --quick --mosaic-summary-dkv --no-sweep --shapes 2x16384x8x64,8x12288x8x64 > $OUT/mdkv.log 2>&1; el "mdkv rc=$?"
timeout -s KILL 270 python3 .gpu_data/probe_mdq_first.py $OUT > $OUT/probe_s7a.log 2>&1; el "probe rc=$?"
rm -rf $OUT/trace_*/plugins/profile/*/*.xplane.pb
grep -E "GPU check|FAILED|rror" $OUT/mdkv.log | cut -c1-300 | head -20
grep -v "^[WI][0-9]" $OUT/mdkv.log | tail -14
grep -v "^[WI][0-9]" $OUT/probe_s7a.log | tail -60 | cut -c1-400
