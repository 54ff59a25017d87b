export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
E="--config configs/enwik8.py --config.data.path=.gpu_data/enwik8_first_1MB.xml --config.data.batch_size=8 --steps 5 --warmup 2"
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*" timeout 150 python3 scripts/bench_train.py $E --impls auto --config.model.remat=save_attention --profile /tmp/prof --profile_steps 2 --profile_top 120 --out $OUT/bt_prof.json > $OUT/bt_prof.log 2>&1; el "bt prof rc=$?"
ls -la /tmp/hlo | head -30
mkdir -p $OUT/hlo; cp /tmp/hlo/*after_optimizations.txt $OUT/hlo/ 2>/dev/null; cp /tmp/hlo/*after_optimizations*buffer* $OUT/hlo/ 2>/dev/null; gzip $OUT/hlo/*; ls -la $OUT/hlo
grep -v "^[WI][0-9]" $OUT/bt_prof.log | tail -30
