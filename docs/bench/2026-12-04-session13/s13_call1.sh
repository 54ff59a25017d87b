# Session 13 call 1: enwik8 8-layer train step, remat none vs save_attention_dots, residual f32 vs bf16, both impls.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2 --config.model.num_layers=8 --impls cudnn_dense,auto"
run() { name=$1; shift; timeout -s KILL 170 python3 scripts/bench_train.py $E "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1; el "$name rc=$?"; grep -E "^(impl|pallas|cudnn)|memory analysis|rror" $OUT/$name.log | grep -v "^[WI][0-9]" | cut -c1-220; }
run sad --config.model.remat=save_attention_dots
run none --config.model.remat=none
run sad_bf --config.model.remat=save_attention_dots --config.model.residual_dtype=bfloat16
run none_bf --config.model.remat=none --config.model.residual_dtype=bfloat16
