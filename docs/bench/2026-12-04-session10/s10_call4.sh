# Session 10 call 4: GPU check of the final defaults (delta_in_dq on; index grids inside masked steps), then a profile of the enwik8 30-layer train step.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 190 python3 scripts/bench_attention.py $OUT/check.json --check-only > $OUT/check.log 2>&1; el "check rc=$?"
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout -s KILL $(( 575 - $(date +%s) + t0 )) python3 scripts/bench_train.py $E --impls auto --config.model.remat=save_attention_dots --profile /tmp/btp --profile_steps 2 --profile_top 45 --out $OUT/bt.json > $OUT/bt.log 2>&1; el "train rc=$?"
grep -v "^[WI][0-9]" $OUT/check.log | tail -16 | cut -c1-220
grep -v "^[WI][0-9]" $OUT/bt.log | grep -v "^\s*$" | tail -75 | cut -c1-200
