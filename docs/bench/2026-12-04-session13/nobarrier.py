"""bench_train.py with model.to_stream replaced by a plain cast (no optimization barrier): A/B only."""
import runpy, sys
import sparse_lm.model as M
M.to_stream = lambda x, dtype: x.astype(dtype)
sys.argv[0] = "scripts/bench_train.py"
runpy.run_path("scripts/bench_train.py", run_name="__main__")
