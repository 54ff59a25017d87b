# Session 10 call 2: strided launch variants; ptxas reports of the Mosaic kernels.
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1 SPARSE_LM_SHARED_DATA=$PWD/.gpu_data/data
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout -s KILL 300 python3 .gpu_data/probe_s10b.py $OUT s default,delta,col4,col4_w8,col_w8,b128_w8,b128_w4,bq128_bk64_w8 > $OUT/b.log 2>&1; el "b rc=$?"
mkdir -p $OUT/mdump
MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=$OUT/mdump ONLY16K=1 timeout -s KILL $(( 560 - $(date +%s) + t0 )) python3 .gpu_data/probe_s10a.py $OUT dump fixed_default,fixed_dkv128,fixed_mf > $OUT/dump.log 2>&1; el "dump rc=$?"
ls -la $OUT/mdump | head -30; du -sh $OUT/mdump
grep -E "^\||FAILED|rror|device kernels|^  " $OUT/b.log | grep -v "^[WI][0-9]" | cut -c1-200 | head -150
grep -i -E "registers|spill|stack|ptxas" -r $OUT/mdump $OUT/dump.log | cut -c1-250 | head -40
