# Session 10 call 3: index grids built inside masked steps (register pressure): Mosaic dK/dV at 64 and 128 query rows, mosaic_forward; PTX of each Mosaic kernel; delta_in_dq on other patterns.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
mkdir -p /tmp/mdump
MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=/tmp/mdump ONLY16K=1 NOPROF=1 timeout -s KILL 150 python3 .gpu_data/probe_s10a.py $OUT dump fixed_default,fixed_mf,fixed_dkv128,fixed_dkv128_noov > $OUT/dump.log 2>&1; el "dump rc=$?"
(cd /tmp/mdump && ls > $OUT/mdump_list.txt && tar czf $OUT/mdump.tgz *.ptx *.ptxas 2>/dev/null); grep -h -A1 "Function properties" /tmp/mdump/*.ptxas | grep spill
timeout -s KILL 260 python3 .gpu_data/probe_s10a.py $OUT fixed fixed_default,fixed_mf,fixed_dkv128,fixed_dkv128_mf,fixed_dkv128_noov,fixed_dkv128_noov_mf > $OUT/fixed.log 2>&1; el "fixed rc=$?"
NOPROF=1 timeout -s KILL $(( 570 - $(date +%s) + t0 )) python3 .gpu_data/probe_s10a.py $OUT delta mh_default,mh_delta,local_default,local_delta,strided_default,strided_delta > $OUT/delta.log 2>&1; el "delta rc=$?"
for f in dump fixed delta; do echo "== $f"; grep -E "^\||FAILED|rror|device kernels|^        " $OUT/$f.log | grep -v "^[WI][0-9]" | cut -c1-200 | head -80; done
