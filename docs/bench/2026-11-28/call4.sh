export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout 100 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --out $OUT/bt30_full.json > $OUT/bt30_full.log 2>&1; el "bt30 full rc=$?"
timeout 110 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --config.model.remat=none --profile /tmp/btpn --out $OUT/bt30_none.json > $OUT/bt30_none.log 2>&1; el "bt30 none rc=$?"
timeout 100 python3 .gpu_data/probe4.py > $OUT/probe4.log 2>&1; el "probe4 rc=$?"
timeout 130 python3 scripts/bench_train.py --config configs/audio.py --config.data.path=.gpu_data/data/audio/music --impls auto --steps 3 --warmup 1 --find_max_batch --max_batch 64 --out $OUT/bt_audio.json > $OUT/bt_audio.log 2>&1; el "audio rc=$?"
for f in bt30_full bt30_none bt_audio; do echo "== $f"; grep -v "^[WI][0-9]" $OUT/$f.log | grep -E "compiled in|^  [a-z]|impl|^pallas|^cudnn|^ref|batch|Error|rror:" | head -30; done
grep -v "^[WI][0-9]" $OUT/probe4.log | grep -E "f\+b: device|mgpu|sparse_attn|cudnn_gen|TIME"
