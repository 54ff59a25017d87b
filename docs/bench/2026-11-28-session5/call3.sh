export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 130 python3 scripts/bench_attention.py $OUT/check.json --check-only --quick > $OUT/check.log 2>&1; el "check rc=$?"
timeout 150 python3 scripts/bench_attention.py $OUT/final.json --quick --skip-check --split-bwd --no-sweep --shapes 2x16384x8x64,1x65536x8x64,2x16384x8x128 > $OUT/final.log 2>&1; el "final rc=$?"
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout 230 python3 scripts/bench_train.py $E --impls cudnn_dense,auto --config.model.scan_layers=False --config.model.remat=save_attention_dots --out $OUT/bt_sad_unrolled3.json > $OUT/bt_sad_unrolled3.log 2>&1; el "sad unrolled rc=$?"
grep -E "GPU check|FAILED" $OUT/check.log; grep "column_taken" $OUT/check.log | cut -c1-300
grep -v "^[WI][0-9]" $OUT/final.log | tail -16
grep -v "^[WI][0-9]" $OUT/bt_sad_unrolled3.log | grep -E "compiled in|^pallas|^cudnn|rror" | cut -c1-150 | head -12
