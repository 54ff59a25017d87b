# Session 14 call 3: same-machine A/B with kernel profiles: 8-layer enwik8 step (remat none, bf16 stream, ours only), layer_norm_impl xla vs pallas_gpu (committed constants).
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2 --config.model.remat=none --config.model.residual_dtype=bfloat16 --config.model.num_layers=8 --impls auto"
run() { name=$1; lim=$2; shift; shift; timeout -s KILL $lim python3 scripts/bench_train.py "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1; el "$name rc=$?"; grep -E "^(impl|pallas|cudnn)|memory analysis|rror" $OUT/$name.log | grep -v "^[WI][0-9]" | cut -c1-200; }
run xla 100 $E
run pln 100 $E --config.model.layer_norm_impl=pallas_gpu
run xla_prof 100 $E --profile /tmp/p1 --profile_steps 2 --profile_top 45
run pln_prof 100 $E --config.model.layer_norm_impl=pallas_gpu --profile /tmp/p2 --profile_steps 2 --profile_top 45
for n in xla_prof pln_prof; do echo "== $n"; grep -E "^ +[0-9.]+ ms" $OUT/$n.log | head -45 | cut -c1-150; done
