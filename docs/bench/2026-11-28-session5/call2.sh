export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 100 python3 scripts/bench_attention.py $OUT/col2.json --quick --skip-check --column-bwd --no-sweep --shapes 2x16384x8x128,1x65536x8x64 > $OUT/col2.log 2>&1; el "col2 rc=$?"
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true timeout 60 python3 scripts/bench_train.py $E --impls auto --out $OUT/bt_sa_dsf.json > $OUT/bt_sa_dsf.log 2>&1; el "dsf rc=$?"
timeout 165 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --config.model.scan_layers=False --out $OUT/bt_sa_unrolled.json > $OUT/bt_sa_unrolled.log 2>&1; el "sa unrolled rc=$?"
timeout 175 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --config.model.scan_layers=False --config.model.remat=save_attention_dots --out $OUT/bt_sad_unrolled2.json > $OUT/bt_sad_unrolled2.log 2>&1; el "sad unrolled rc=$?"
grep -v "^[WI][0-9]" $OUT/col2.log | tail -9
for f in bt_sa_dsf bt_sa_unrolled bt_sad_unrolled2; do echo "== $f"; grep -v "^[WI][0-9]" $OUT/$f.log | grep -E "compiled in|^pallas|^cudnn|rror" | cut -c1-150 | head -12; done
