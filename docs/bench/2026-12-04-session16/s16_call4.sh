# Planned call 4 (if time is left): why the dK/dV+dq kernel runs ~361 TF/s at T=16,384 and
# ~450 at T=65,536. Nsight Compute on that kernel alone at both lengths, if the image has it.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
cp -r .gpu_data/src/sparse_lm .gpu_data/src/scripts .gpu_data/src/configs .
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1); echo "ncu: ${NCU:-none}"
[ -z "$NCU" ] && exit 0
for s in 2x16384x8x64 1x65536x8x64; do
  timeout -s KILL 250 $NCU --kernel-name regex:dkvdq --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
      python3 .gpu_data/one_fixed_fb.py $s > $OUT/ncu_$s.txt 2>&1; echo "$s rc=$?"
  grep -E "Duration|Throughput|Stall|Warp Cycles|Hit Rate|Achieved Occupancy" $OUT/ncu_$s.txt | head -30
done
