# Session 13 call 3: fused_ops (LayerNorm, bias+GELU custom VJPs): 8-layer step f32/bf16 stream, profile; 30-layer none+bf16.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
B="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
E="$B --config.model.num_layers=8"
run() { name=$1; lim=$2; shift; shift; timeout -s KILL $lim python3 scripts/bench_train.py "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1; el "$name rc=$?"; grep -E "^(impl|pallas|cudnn)|memory analysis|rror" $OUT/$name.log | grep -v "^[WI][0-9]" | cut -c1-200; }
run none_bf 150 $E --impls cudnn_dense,auto --config.model.remat=none --config.model.residual_dtype=bfloat16
run none 150 $E --impls cudnn_dense,auto --config.model.remat=none
XLA_FLAGS="--xla_dump_to=/tmp/hd --xla_dump_hlo_module_re=.*train.*" run prof 100 $E --impls auto --config.model.remat=none --config.model.residual_dtype=bfloat16 --profile /tmp/btp --profile_steps 2 --profile_top 40
(cd /tmp/hd && tar czf $OUT/hlo.tgz $(ls | grep gpu_after_optimizations.txt | head -1))
run l30_none_bf 280 $B --impls cudnn_dense,auto --config.model.remat=none --config.model.residual_dtype=bfloat16
