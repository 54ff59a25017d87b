# Session 12 call 4: dS^T double-buffered in the key-major dK/dV+dq kernel (DQ_DS_BUFFERS 2 vs 1); query-major with vector masks.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
for v in fixed_default fixed_qm; do mkdir -p /tmp/md_$v
MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=/tmp/md_$v ONLY16K=1 NOPROF=1 timeout -s KILL 60 python3 .gpu_data/probe_s12a.py $OUT dump_$v $v > $OUT/dump_$v.log 2>&1; el "dump $v rc=$?"
(cd /tmp/md_$v && tar czf $OUT/mdump_$v.tgz *.ptx *.ptxas 2>/dev/null); grep -h -A2 "Function properties" /tmp/md_$v/*.ptxas | grep -E "spill|Used"; done
timeout -s KILL 330 python3 .gpu_data/probe_s12a.py $OUT fixed fixed_ds1,fixed_default,fixed_qm_grid,fixed_qm,fixed_ds1_mf,fixed_mf > $OUT/fixed.log 2>&1; el "fixed rc=$?"
for f in fixed; do echo "== $f"; grep -E "^\||FAILED|rror|device kernels|__mosaic_gpu_kernel" $OUT/$f.log | grep -v "^[WI][0-9]" | cut -c1-200 | head -70; done
