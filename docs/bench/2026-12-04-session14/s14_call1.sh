# Session 14 call 1: Pallas LayerNorm backward: microbench, then the 8-layer enwik8 step (remat none, bf16 stream) with layer_norm_impl xla vs pallas_gpu.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 120 python3 scripts/bench_layer_norm.py --out $OUT/ln.json > $OUT/ln.log 2>&1; el "ln rc=$?"; tail -8 $OUT/ln.log
B="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2 --config.model.remat=none --config.model.residual_dtype=bfloat16"
E="$B --config.model.num_layers=8"
run() { name=$1; lim=$2; shift; shift; timeout -s KILL $lim python3 scripts/bench_train.py "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1; el "$name rc=$?"; grep -E "^(impl|pallas|cudnn)|memory analysis|rror" $OUT/$name.log | grep -v "^[WI][0-9]" | cut -c1-200; }
run l8_xla 150 $E --impls cudnn_dense,auto
run l8_pln 150 $E --impls cudnn_dense,auto --config.model.layer_norm_impl=pallas_gpu
