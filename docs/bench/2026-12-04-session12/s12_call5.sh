# Session 12 call 5: the committed code: defaults, query-major, mosaic_forward (sanity and timings).
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs . ; export PYTHONUNBUFFERED=1
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
NOPROF=1 timeout -s KILL 200 python3 .gpu_data/probe_s12a.py $OUT final fixed_default,fixed_qm,fixed_mf,fixed_qm_mf > $OUT/final.log 2>&1; el "final rc=$?"
grep -E "^\||FAILED|rror" $OUT/final.log | grep -v "^[WI][0-9]" | cut -c1-200 | head -30
