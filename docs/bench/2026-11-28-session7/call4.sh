# Session 7 call 4: enwik8 30-layer train step, new defaults, vs cuDNN dense (same run); fixed 64k probe.
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout -s KILL 430 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --config.model.remat=save_attention_dots --out $OUT/bt.json > $OUT/bt.log 2>&1; el "train rc=$?"
timeout -s KILL 100 python3 .gpu_data/probe_fixed_64k.py > $OUT/probe_s7d.log 2>&1; el "probe rc=$?"
grep -v "^[WI][0-9]" $OUT/bt.log | grep -E "compiled in|peak|^pallas|^cudnn|^auto|^\[|rror|step|MFU|speed" | cut -c1-200 | head -24
grep -v "^[WI][0-9]" $OUT/probe_s7d.log | tail -6
