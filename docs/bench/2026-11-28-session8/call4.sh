# Session 8 call 4: enwik8 30-layer train step (pallas, diag_bwd + knobs + fills tied to do), then the GPU check of the defaults.
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout -s KILL 330 python3 scripts/bench_train.py $E --impls auto --config.model.remat=save_attention_dots --out $OUT/bt.json > $OUT/bt.log 2>&1; el "train rc=$?"
timeout -s KILL $(( 590 - $(date +%s) + t0 )) python3 scripts/bench_attention.py $OUT/chk.json --check-only --quick > $OUT/chk.log 2>&1; el "check rc=$?"
grep -v "^[WI][0-9]" $OUT/bt.log | grep -E "compiled in|peak|^pallas|^cudnn|^auto|^\[|rror|step|MFU|speed" | cut -c1-200 | head -24
grep -E "GPU check|FAILED" $OUT/chk.log | cut -c1-300 | head
