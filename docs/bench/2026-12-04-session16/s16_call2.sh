# Planned call 2: the 30-layer enwik8 step, cuDNN-dense against the sparse model with the
# persistent Mosaic kernels (forward and dK/dV+dq), one process (compile time is in the log: "compiled in").
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs .
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2 --config.model.remat=none --config.model.residual_dtype=bfloat16"
timeout -s KILL 570 python3 scripts/bench_train.py $E --impls cudnn_dense,auto+mosaic_forward+mosaic_forward_persistent+mosaic_dkvdq_persistent \
    --out $OUT/bt1.json > $OUT/bt1.log 2>&1; el "bt1 rc=$?"
grep -E "compiled in|median step|failed|Error" $OUT/bt1.log | cut -c1-220; tail -8 $OUT/bt1.log
