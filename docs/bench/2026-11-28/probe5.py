"""Device call 5: heavy-first launch order A/B per kernel (fixed, strided), Triton v2."""
import json, os, sys
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
import jax, jax.numpy as jnp
from sparse_lm.attention import PatternSpec, pallas_gpu
from sparse_lm import profiling
from bench_attention import time_jax, fwd_bwd
OUT = os.environ["OUT"]; R = []
for shape, name, spec in [((2, 16384, 8, 64), "fixed", PatternSpec("fixed", 128, 32, combine="merged")),
                          ((2, 16384, 8, 128), "fixed", PatternSpec("fixed", 128, 32, combine="merged"))]:
    q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16) for kk in jax.random.split(jax.random.PRNGKey(1), 4))
    pat = spec.layer_pattern(0, shape[2])
    for hf in (False, True, False, True):
        f = jax.jit(fwd_bwd(lambda q, k, v, hf=hf: pallas_gpu.attention(q, k, v, pat, heavy_first=hf)))
        ms = time_jax(f, q, k, v, do)
        d = f"/tmp/p5/{name}_{shape[3]}_{hf}_{len(R)}"
        profiling.profile(lambda: f(q, k, v, do), d, 3)
        b = profiling.kernel_breakdown(d, steps=3, top=12)
        row = dict(shape=shape, pattern=name, heavy_first=hf, fb_ms=ms,
                   kernels={n: round(t * 1e3) for n, t, _ in b["top"] if n.startswith("sparse_attn")})
        R.append(row); print("ROW", json.dumps(row), flush=True)
json.dump(R, open(f"{OUT}/probe5.json", "w"), indent=1)
