export PYTHONUNBUFFERED=1
timeout -s KILL 100 python3 .gpu_data/probe_s6f.py > $OUT/probe_s6f.log 2>&1; echo "probe rc=$?"
grep "^|" $OUT/probe_s6f.log; grep -i "error" $OUT/probe_s6f.log | tail -3
