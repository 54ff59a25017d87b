export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 200 python3 .gpu_data/probe2.py > $OUT/probe2.log 2>&1; el "probe2 rc=$?"
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout 230 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --profile /tmp/btp --out $OUT/bt30.json > $OUT/bt30.log 2>&1; el "bt30 rc=$?"
timeout 140 python3 scripts/bench_train.py $E --impls auto --config.model.remat=dots --profile /tmp/btp2 --out $OUT/bt30_dots.json > $OUT/bt30_dots.log 2>&1; el "bt30 dots rc=$?"
grep -v "^[WI][0-9]" $OUT/probe2.log | grep -A30 "==== summary"
for f in bt30 bt30_dots; do grep -v "^[WI][0-9]" $OUT/$f.log | grep -E "profile|^  [a-z]|ms  x|impl|pallas|cudnn|reference|mosaic|largest|Error" | head -60; done
