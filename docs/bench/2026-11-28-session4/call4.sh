export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 150 python3 scripts/bench_attention.py $OUT/check.json --check-only > $OUT/check.log 2>&1; el "check rc=$?"
timeout 200 python3 scripts/bench_attention.py $OUT/bench_final.json --quick --skip-check --split-launch --atomic-dq --mosaic --no-sweep --shapes 2x16384x8x64,1x65536x8x64,2x16384x8x128 > $OUT/bench_final.log 2>&1; el "bench rc=$?"
timeout 150 python3 scripts/bench_train.py --config configs/cifar10.py --config.data.path=.gpu_data/data/cifar10-sample/cifar-10-batches-bin --config.data.batch_size=16 --impls auto,cudnn_dense --steps 5 --warmup 1 --out $OUT/bt_cifar.json > $OUT/bt_cifar.log 2>&1; el "cifar rc=$?"
grep -E "GPU check|FAILED" $OUT/check.log
grep -v "^[WI][0-9]" $OUT/bench_final.log | tail -22
grep -v "^[WI][0-9]" $OUT/bt_cifar.log | grep -E "compiled in|^pallas|^cudnn|rror|step ms" | head
