# Session 14 call 5: enwik8 30-layer step with attention.mosaic_forward=True, remat none, bf16 stream, committed defaults (layer_norm_impl=auto -> Pallas LayerNorm backward on GPU), both impls; synced and pipelined step times.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
B="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2 --config.model.remat=none --config.model.residual_dtype=bfloat16"
run() { name=$1; lim=$2; shift; shift; timeout -s KILL $lim python3 scripts/bench_train.py "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1; el "$name rc=$?"; grep -E "^(impl|pallas|cudnn)|memory analysis|median step|rror" $OUT/$name.log | grep -v "^[WI][0-9]" | cut -c1-200; }
run l30_mfwd 440 $B --impls cudnn_dense,auto --config.attention.mosaic_forward=True
