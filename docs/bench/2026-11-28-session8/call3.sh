# Session 8 call 3: diag_bwd launch parameters (probe C), then the enwik8 30-layer train step (pallas, new defaults).
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 170 python3 .gpu_data/probe_s8c.py $OUT > $OUT/probe_s8c.log 2>&1; el "probe rc=$?"
rm -rf $OUT/trace_*/plugins/profile/*/*.xplane.pb
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout -s KILL $(( 585 - $(date +%s) + t0 )) python3 scripts/bench_train.py $E --impls auto --config.model.remat=save_attention_dots --out $OUT/bt.json > $OUT/bt.log 2>&1; el "train rc=$?"
grep -v "^[WI][0-9]" $OUT/probe_s8c.log | grep -E "sparse_attn_bwd|mosaic|busy" | cut -c1-200
grep -v "^[WI][0-9]" $OUT/bt.log | grep -E "compiled in|peak|^pallas|^cudnn|^auto|^\[|rror|step|MFU|speed" | cut -c1-200 | head -24
grep -v "^[WI][0-9]" $OUT/probe_s8c.log | tail -16
