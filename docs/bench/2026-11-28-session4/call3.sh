export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 100 python3 scripts/bench_attention.py $OUT/bench_d128.json --quick --skip-check --split-launch --wide-chain --atomic-dq --no-sweep --shapes 2x16384x8x128 > $OUT/bench_d128.log 2>&1; el "bench rc=$?"
timeout 400 python3 scripts/tune_attention.py $OUT/tune128.json --shapes 2x16384x8x128 --patterns fixed,strided --blocks 64x64,64x32,128x64 --warps 4,8 --stages 2,3 --deadline_s 330 > $OUT/tune128.log 2>&1; el "tune rc=$?"
grep -v "^[WI][0-9]" $OUT/bench_d128.log | tail -9
grep -v "^[WI][0-9]" $OUT/tune128.log | tail -45
