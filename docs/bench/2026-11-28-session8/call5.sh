# Session 8 call 5: enwik8 30-layer train step with cuDNN dense attention (the baseline; same machine as call 4).
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout -s KILL 400 python3 scripts/bench_train.py $E --impls cudnn_dense --config.model.remat=save_attention_dots --out $OUT/bt_cudnn.json > $OUT/bt_cudnn.log 2>&1; el "train rc=$?"
grep -v "^[WI][0-9]" $OUT/bt_cudnn.log | grep -E "compiled in|peak|^pallas|^cudnn|^auto|^\[|rror|step|MFU|speed" | cut -c1-200 | head -24
