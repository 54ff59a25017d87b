export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 120 python3 .gpu_data/probe_s6e.py $OUT > $OUT/probe_s6e.log 2>&1; el "probe rc=$?"
rm -rf $OUT/trace_*
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout -s KILL 330 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --config.model.remat=save_attention_dots --out $OUT/bt_sad.json > $OUT/bt_sad.log 2>&1; el "train rc=$?"
grep -v "^[WI][0-9]" $OUT/probe_s6e.log | grep -v "^{" | tail -24
grep -v "^[WI][0-9]" $OUT/bt_sad.log | grep -E "compiled in|peak|^pallas|^cudnn|^auto|rror|step|MFU" | cut -c1-160 | head -20
