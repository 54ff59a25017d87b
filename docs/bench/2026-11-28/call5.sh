export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 70 python3 .gpu_data/probe5.py > $OUT/probe5.log 2>&1; el "probe5 rc=$?"
timeout 130 python3 scripts/bench_attention.py $OUT/bench_final.json --quick --skip-check --no-sweep --shapes 2x16384x8x64,1x65536x8x64 > $OUT/bench_final.log 2>&1; el "bench rc=$?"
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
timeout 80 python3 scripts/bench_train.py $E --impls auto,cudnn_dense --out $OUT/bt30_final.json > $OUT/bt30_final.log 2>&1; el "bt30 rc=$?"
timeout 150 python3 scripts/bench_train.py --config configs/audio.py --config.data.path=.gpu_data/data/audio/music --impls auto --steps 2 --warmup 1 --find_max_batch --max_batch 32 --out $OUT/bt_audio.json > $OUT/bt_audio.log 2>&1; el "audio rc=$?"
grep ROW $OUT/probe5.log
grep -v "^[WI][0-9]" $OUT/bench_final.log | tail -16
for f in bt30_final bt_audio; do echo "== $f"; grep -v "^[WI][0-9]" $OUT/$f.log | grep -E "compiled in|impl|^pallas|^cudnn|batch|rror" | head -20; done
