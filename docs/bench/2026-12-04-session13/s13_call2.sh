# Session 13 call 2: 8-layer enwik8 step, remat none + bf16 residual: profile with HLO dump; cuBLASLt epilogues; dropout cost.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2 --config.model.num_layers=8 --config.model.remat=none --config.model.residual_dtype=bfloat16"
run() { name=$1; shift; timeout -s KILL 170 python3 scripts/bench_train.py $E "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1; el "$name rc=$?"; grep -E "^(impl|pallas|cudnn)|memory analysis|rror" $OUT/$name.log | grep -v "^[WI][0-9]" | cut -c1-220; }
XLA_FLAGS="--xla_dump_to=/tmp/hd --xla_dump_hlo_module_re=.*train.*" run prof --impls auto --profile /tmp/btp --profile_steps 2 --profile_top 60
ls /tmp/hd | head; (cd /tmp/hd && tar czf $OUT/hlo.tgz $(ls | grep after_optimizations.txt | head -4)); ls -la $OUT/hlo.tgz
XLA_FLAGS=--xla_gpu_enable_cublaslt=true run lt --impls cudnn_dense,auto
run drop0 --impls auto --config.model.dropout=0.0
