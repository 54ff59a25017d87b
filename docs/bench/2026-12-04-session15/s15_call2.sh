# Session 15 call 2: the persistent Mosaic merged forward against the per-item one and HEAD's, same machine.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi -L; t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs .
LONG=1 timeout -s KILL 300 python3 .gpu_data/probe_s15a.py $OUT new fixed_default,fixed_mf,fixed_mf_pers,fixed_mf_pers3,fixed_mf_pers_nopp > $OUT/new.log 2>&1; el "new rc=$?"
rm -rf sparse_lm scripts configs; cp -r .gpu_data/old/sparse_lm .gpu_data/old/scripts .gpu_data/old/configs .
LONG=1 timeout -s KILL 120 python3 .gpu_data/probe_s15a.py $OUT old fixed_mf > $OUT/old.log 2>&1; el "old rc=$?"
for f in new old; do echo "== $f"; grep -E "^\||FAILED|rror" $OUT/$f.log | grep -v "^[WI][0-9]" | cut -c1-260 | head -30; done
