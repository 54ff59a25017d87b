# Session 13 call 5: same machine A/B of the bf16 stream's optimization barrier (8 layers, remat none, pallas_gpu only).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2 --config.model.num_layers=8 --impls auto --config.model.remat=none --config.model.residual_dtype=bfloat16"
timeout -s KILL 100 python3 .gpu_data/nobarrier.py $E --out $OUT/nobar.json > $OUT/nobar.log 2>&1; el "nobar rc=$?"; grep -E "^pallas" $OUT/nobar.log
timeout -s KILL 100 python3 scripts/bench_train.py $E --out $OUT/bar.json > $OUT/bar.log 2>&1; el "bar rc=$?"; grep -E "^pallas" $OUT/bar.log
