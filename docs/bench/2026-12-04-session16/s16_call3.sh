# Planned call 3 (on the machine of call 2, back to back): the defaults and the per-tile
# Mosaic forward in the same step, to place call 2's figure against both.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs .
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2 --config.model.remat=none --config.model.residual_dtype=bfloat16"
timeout -s KILL 570 python3 scripts/bench_train.py $E --impls auto,auto+mosaic_forward \
    --out $OUT/bt2.json > $OUT/bt2.log 2>&1; el "bt2 rc=$?"
grep -E "compiled in|median step|failed|Error" $OUT/bt2.log | cut -c1-220; tail -8 $OUT/bt2.log
