# Session 7 call 3: enwik8 30-layer train step with the new defaults (mosaic_summary_dq on for merged) vs cuDNN dense; probe C.
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout -s KILL 330 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --config.model.remat=save_attention_dots --out $OUT/bt.json > $OUT/bt.log 2>&1; el "train rc=$?"
timeout -s KILL 200 python3 .gpu_data/probe_multihead_interleaved.py $OUT > $OUT/probe_s7c.log 2>&1; el "probe rc=$?"
rm -rf $OUT/trace_*/plugins/profile/*/*.xplane.pb
grep -v "^[WI][0-9]" $OUT/bt.log | grep -E "compiled in|peak|^pallas|^cudnn|^auto|rror|step|MFU" | cut -c1-160 | head -20
grep -v "^[WI][0-9]" $OUT/probe_s7c.log | grep -v "^| " | tail -30 | cut -c1-200
grep -v "^[WI][0-9]" $OUT/probe_s7c.log | tail -14
