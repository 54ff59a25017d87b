# Planned call 1 (not run in session 16: no machine was lent): are the persistent Mosaic
# kernels (forward; dK/dV+dq) correct on the GPU, and faster? Each step in its own
# process under a hard timeout, the check and one shape first, so that a hang costs
# that step and not the call.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs .
V="--quick --no-sweep --mosaic-forward --mosaic-forward-persistent --mosaic-dkvdq-persistent --persistent"
timeout -s KILL 300 python3 scripts/bench_attention.py $OUT/pers1.json $V --shapes 2x16384x8x64 > $OUT/pers1.log 2>&1
rc=$?; el "pers1 (GPU check + (2, 16384, 8, 64)) rc=$rc"
if [ $rc = 0 ]; then
  timeout -s KILL 380 python3 scripts/bench_attention.py $OUT/pers2.json $V --skip-check \
      --shapes 8x12288x8x64,1x65536x8x64 > $OUT/pers2.log 2>&1; el "pers2 rc=$?"
fi
for f in pers1 pers2; do echo "== $f"; grep -E "GPU check|FAILED|^ *ours|^ *cudnn|fixed|rror" $OUT/$f.log 2>/dev/null | grep -v "^[WI][0-9]" | cut -c1-220 | tail -40; done
