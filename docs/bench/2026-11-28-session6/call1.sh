export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 200 python3 scripts/bench_attention.py $OUT/strip16.json --quick --strip-bwd --summary-dkv-128 --no-sweep --shapes 2x16384x8x64 > $OUT/strip16.log 2>&1; el "strip16 rc=$?"
timeout 150 python3 scripts/bench_attention.py $OUT/strip64.json --quick --skip-check --strip-bwd --no-sweep --shapes 1x65536x8x64 > $OUT/strip64.log 2>&1; el "strip64 rc=$?"
grep -E "GPU check|FAILED|strip_taken|rror" $OUT/strip16.log | cut -c1-300 | head -20
grep -v "^[WI][0-9]" $OUT/strip16.log | tail -14
grep -v "^[WI][0-9]" $OUT/strip64.log | grep -E "rror" | head; grep -v "^[WI][0-9]" $OUT/strip64.log | tail -8
