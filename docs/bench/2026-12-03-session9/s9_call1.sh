# Session 9 call 1: mosaic_forward on the GPU (turns off, on; each its own process), the dK/dV slots, defaults vs diag off, then the attention table.
export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 110 python3 .gpu_data/probe_s9a.py fwd_nopp $OUT > $OUT/fwd_nopp.log 2>&1; r1=$?; el "fwd_nopp rc=$r1"
timeout -s KILL 100 python3 .gpu_data/probe_s9a.py fwd_pp $OUT > $OUT/fwd_pp.log 2>&1; r2=$?; el "fwd_pp rc=$r2"
mf=; [ $r1 = 0 ] && mf=mf
timeout -s KILL 230 python3 .gpu_data/probe_s9a.py dkv $OUT $mf > $OUT/dkv.log 2>&1; el "dkv rc=$?"
timeout -s KILL $(( 585 - $(date +%s) + t0 )) python3 scripts/bench_attention.py $OUT/table.json --quick --skip-check --no-sweep --shapes 2x16384x8x64,1x65536x8x64 > $OUT/table.log 2>&1; el "table rc=$?"
for f in fwd_nopp fwd_pp dkv; do echo "== $f"; grep -E "^\||FAILED|rror|device kernels|^  " $OUT/$f.log | grep -v "^[WI][0-9]" | cut -c1-220 | head -40; done
echo "== table"; tail -30 $OUT/table.log | cut -c1-220
