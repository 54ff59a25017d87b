export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 190 python3 scripts/bench_attention.py $OUT/col.json --quick --column-bwd --no-sweep --shapes 2x16384x8x64,2x16384x8x128 > $OUT/col.log 2>&1; el "col rc=$?"
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout 110 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --out $OUT/bt_sa.json > $OUT/bt_sa.log 2>&1; el "save_attention rc=$?"
timeout 110 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --config.model.remat=save_attention_dots --out $OUT/bt_sad.json > $OUT/bt_sad.log 2>&1; el "save_attention_dots rc=$?"
timeout 170 python3 scripts/bench_train.py $E --impls auto --config.model.remat=save_attention_dots --config.model.scan_layers=False --out $OUT/bt_sad_unrolled.json > $OUT/bt_sad_unrolled.log 2>&1; el "unrolled rc=$?"
grep -E "GPU check|FAILED|column" $OUT/col.log | head -20
grep -v "^[WI][0-9]" $OUT/col.log | tail -16
for f in bt_sa bt_sad bt_sad_unrolled; do echo "== $f"; grep -v "^[WI][0-9]" $OUT/$f.log | grep -E "compiled in|peak|^pallas|^cudnn|rror|step" | head -12; done
