export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 70 python3 scripts/check_kernel_training.py --data .gpu_data/enwik8_first_1MB.xml --out $OUT/ckt2.json --steps 6 --impls reference pallas_gpu pallas_gpu+atomic_dq > $OUT/ckt2.log 2>&1; el "ckt rc=$?"
timeout 200 python3 scripts/bench_attention.py $OUT/bench_defaults.json --quick --skip-check --atomic-dq --no-sweep --shapes 2x16384x8x64,1x65536x8x64,2x16384x8x128 > $OUT/bench_defaults.log 2>&1; el "bench rc=$?"
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout 100 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --config.model.remat=save_attention --out $OUT/bt_saved.json > $OUT/bt_saved.log 2>&1; el "bt saved rc=$?"
timeout 60 python3 scripts/bench_train.py $E --impls auto --out $OUT/bt_full.json > $OUT/bt_full.log 2>&1; el "bt full rc=$?"
grep -v "^[WI][0-9]" $OUT/ckt2.log | tail -8
grep -v "^[WI][0-9]" $OUT/bench_defaults.log | tail -14
for f in bt_saved bt_full; do echo "== $f"; grep -v "^[WI][0-9]" $OUT/$f.log | grep -E "compiled in|impl|^pallas|^cudnn|^auto|batch|rror|MFU|ms" | head -20; done
