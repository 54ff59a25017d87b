# Session 14 call 2: Pallas LayerNorm backward sweep (block sizes, warps, stages); 8-layer step with the fastest setting; 30-layer step (remat none, bf16 stream) with the Pallas LayerNorm at the fastest setting, both impls.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 200 python3 scripts/bench_layer_norm.py --sweep --out $OUT/ln_sweep.json > $OUT/ln_sweep.log 2>&1; el "ln sweep rc=$?"; grep -v "^[WI][0-9]" $OUT/ln_sweep.log | grep "chunk=" | sort -k7 -g | head -10; tail -1 $OUT/ln_sweep.log
export LN_SWEEP=$OUT/ln_sweep.json
B="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2 --config.model.remat=none --config.model.residual_dtype=bfloat16 --config.model.layer_norm_impl=pallas_gpu"
run() { name=$1; lim=$2; shift; shift; timeout -s KILL $lim python3 .gpu_data/tuned_train.py "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1; el "$name rc=$?"; grep -E "^(impl|pallas|cudnn|layer norm)|memory analysis|rror" $OUT/$name.log | grep -v "^[WI][0-9]" | cut -c1-200; }
run l8_pln_tuned 100 $B --config.model.num_layers=8 --impls auto
run l30_pln_tuned 330 $B --impls cudnn_dense,auto
