# Session 13 call 4: bf16 stream kept bf16 (optimization barrier), LayerNorm custom VJP, GELU autodiff: 8-layer A/B + HLO check; 30-layer none+bf16.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
B="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
E="$B --config.model.num_layers=8"
run() { name=$1; lim=$2; shift; shift; timeout -s KILL $lim python3 scripts/bench_train.py "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1; el "$name rc=$?"; grep -E "^(impl|pallas|cudnn)|memory analysis|rror" $OUT/$name.log | grep -v "^[WI][0-9]" | cut -c1-200; }
XLA_FLAGS="--xla_dump_to=/tmp/hd --xla_dump_hlo_module_re=.*train.*" run none_bf 150 $E --impls cudnn_dense,auto --config.model.remat=none --config.model.residual_dtype=bfloat16
(cd /tmp/hd && for f in $(ls | grep gpu_after_optimizations.txt); do echo "$f: top-level f32 stream-size $(grep -c '^  %[a-z_.0-9-]* = f32\[8,12288,512\]' $f) bf16 $(grep -c '^  %[a-z_.0-9-]* = bf16\[8,12288,512\]' $f)"; done; tar czf $OUT/hlo.tgz $(ls | grep gpu_after_optimizations.txt | head -2))
run l30_none_bf 400 $B --impls cudnn_dense,auto --config.model.remat=none --config.model.residual_dtype=bfloat16
