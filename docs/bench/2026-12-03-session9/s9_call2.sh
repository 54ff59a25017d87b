# Session 9 call 2: the launch order of the Mosaic kernels (probe_s9b), then the enwik8 30-layer step with mosaic_forward (profiled), then cuDNN dense.
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . || exit 1  # the snapshot (helpers edit the tree here)
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 200 python3 .gpu_data/probe_s9b.py $OUT > $OUT/s9b.log 2>&1; el "s9b rc=$?"
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout -s KILL 260 python3 scripts/bench_train.py $E --impls auto --config.model.remat=save_attention_dots --config.attention.mosaic_forward=True --profile /tmp/btp --profile_top 40 --out $OUT/bt_mf.json > $OUT/bt_mf.log 2>&1; el "train mf rc=$?"
timeout -s KILL $(( 590 - $(date +%s) + t0 )) python3 scripts/bench_train.py $E --impls cudnn_dense --config.model.remat=save_attention_dots --out $OUT/bt_cudnn.json > $OUT/bt_cudnn.log 2>&1; el "train cudnn rc=$?"
grep -E "^\||FAILED|device kernels|^  " $OUT/s9b.log | cut -c1-200 | head -60
for f in bt_mf bt_cudnn; do echo "== $f"; grep -v "^[WI][0-9]" $OUT/$f.log | grep -E "compiled in|peak|^pallas|^cudnn|^auto|rror|step|MFU|speed" | cut -c1-200 | head -14; done
