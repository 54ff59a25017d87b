# Session 9 call 3: probe_s9c (Mosaic forward launch order, f+b with mosaic_forward), then the enwik8 30-layer step: default, and with JAX_DEFAULT_PRNG_IMPL=unsafe_rbg (dropout masks from XLA's RngBitGenerator instead of threefry).
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 130 python3 .gpu_data/probe_s9c.py $OUT > $OUT/s9c.log 2>&1; el "s9c rc=$?"
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout -s KILL 200 python3 scripts/bench_train.py $E --impls auto --config.model.remat=save_attention_dots --out $OUT/bt.json > $OUT/bt.log 2>&1; el "train rc=$?"
JAX_DEFAULT_PRNG_IMPL=unsafe_rbg timeout -s KILL $(( 590 - $(date +%s) + t0 )) python3 scripts/bench_train.py $E --impls auto --config.model.remat=save_attention_dots --out $OUT/bt_rbg.json > $OUT/bt_rbg.log 2>&1; el "train rbg rc=$?"
grep -E "^\||FAILED|device kernels|^  " $OUT/s9c.log | cut -c1-200 | head -50
for f in bt bt_rbg; do echo "== $f"; grep -v "^[WI][0-9]" $OUT/$f.log | grep -E "compiled in|peak|^pallas|^auto|rror|median|MFU" | cut -c1-200 | head -8; done
