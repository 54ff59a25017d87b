export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 150 python3 .gpu_data/probe_strip.py $OUT/probe_strip.json > $OUT/probe_strip.log 2>&1; el "probe rc=$?"
timeout -s KILL 200 python3 scripts/bench_attention.py $OUT/strip16.json --quick --strip-bwd --summary-dkv-128 --no-sweep --shapes 2x16384x8x64 > $OUT/strip16.log 2>&1; el "strip16 rc=$?"
grep -v "^[WI][0-9]" $OUT/probe_strip.log | grep -v "^{" | tail -12
grep -E "GPU check|FAILED|rror" $OUT/strip16.log | cut -c1-300 | head -20
grep -E "^check" $OUT/strip16.log | cut -c1-60,200-330
grep -v "^[WI][0-9]" $OUT/strip16.log | tail -14
