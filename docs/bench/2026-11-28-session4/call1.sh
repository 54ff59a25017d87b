export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 330 python3 scripts/bench_attention.py $OUT/bench_opts.json --quick --atomic-dq --colaunch --narrow-chain --no-sweep --shapes 2x16384x8x64,1x65536x8x64,2x16384x8x128 > $OUT/bench_opts.log 2>&1; el "bench rc=$?"
timeout 200 python3 scripts/check_kernel_training.py --data .gpu_data/enwik8_first_1MB.xml --out $OUT/ckt.json --steps 6 --impls reference pallas_gpu pallas_gpu+colaunch+atomic_dq pallas_gpu+narrow_chain > $OUT/ckt.log 2>&1; el "ckt rc=$?"
grep -v "^[WI][0-9]" $OUT/bench_opts.log | tail -40
grep -v "^[WI][0-9]" $OUT/ckt.log | tail -12
