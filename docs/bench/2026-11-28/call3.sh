export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout 90 python3 scripts/bench_train.py $E --impls auto --profile /tmp/btp --out $OUT/bt30_bytedrop.json > $OUT/bt30_bytedrop.log 2>&1; el "bt30 bytedrop rc=$?"
timeout 80 python3 scripts/bench_train.py $E --impls auto --config.model.dropout=0.0 --profile /tmp/btp0 --out $OUT/bt30_nodrop.json > $OUT/bt30_nodrop.log 2>&1; el "bt30 nodrop rc=$?"
timeout 330 python3 scripts/tune_attention.py $OUT/tune.json --patterns strided,fixed --blocks 64x64,128x64,32x32,64x128 --warps 4,8 --stages 2,3 --deadline_s 300 > $OUT/tune.log 2>&1; el "tune rc=$?"
for f in bt30_bytedrop bt30_nodrop; do grep -v "^[WI][0-9]" $OUT/$f.log | grep -E "profile|^  [a-z]|ms  x|impl|pallas|Error" | head -24; done
grep -A60 "^card:" $OUT/tune.log
