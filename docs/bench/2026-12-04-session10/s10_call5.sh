# Session 10 call 5: the enwik8 30-layer step, cuDNN-dense and ours in one process (same machine).
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout -s KILL 420 python3 scripts/bench_train.py $E --impls cudnn_dense,auto --config.model.remat=save_attention_dots --out $OUT/bt2.json > $OUT/bt2.log 2>&1; el "train rc=$?"
grep -v "^[WI][0-9]" $OUT/bt2.log | grep -E "compiled|median|impl|pallas|cudnn|dense" | cut -c1-220 | tail -14
