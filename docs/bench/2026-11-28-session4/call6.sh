export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2 --impls auto --config.model.remat=save_attention"
timeout 50 python3 scripts/bench_train.py $E --out $OUT/bt_scan.json > $OUT/bt_scan.log 2>&1; el "scanned rc=$?"
timeout 110 python3 scripts/bench_train.py $E --config.model.scan_layers=False --out $OUT/bt_unrolled.json > $OUT/bt_unrolled.log 2>&1; el "unrolled rc=$?"
for f in bt_scan bt_unrolled; do echo "== $f"; grep -v "^[WI][0-9]" $OUT/$f.log | grep -E "compiled in|^pallas|rror" | head -5; done
