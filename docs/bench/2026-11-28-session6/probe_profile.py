"""Session 6 probe 3: per-kernel breakdown of strided (16k, 64k) and fixed (16k) f+b;
strided launch knobs (stages, warps)."""
import json, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu
from sparse_lm import profiling

out = sys.argv[1]
def inputs(shape):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    return [jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in ks]

def fb(attn):
    def f(q, k, v, g):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(g)
    return jax.jit(f)

res = {}
for name, spec, shape in (("strided16k", PatternSpec("strided", 128, combine="merged"), (2, 16384, 8, 64)),
                          ("strided64k", PatternSpec("strided", 256, combine="merged"), (1, 65536, 8, 64)),
                          ("fixed16k", PatternSpec("fixed", 128, 32, combine="merged"), (2, 16384, 8, 64))):
    pat = spec.layer_pattern(0, 8)
    q, k, v, g = inputs(shape)
    f = fb(lambda *a: pallas_gpu.attention(*a, pat))
    ms = bench.time_jax(f, q, k, v, g)
    d = profiling.profile(lambda: f(q, k, v, g), f"{out}/trace_{name}", steps=5)
    b = profiling.kernel_breakdown(d, steps=5, top=14)
    print(profiling.format_breakdown(f"{name} {shape}", b, ms), flush=True)
    res[name] = dict(ms=ms, breakdown={k_: v_ for k_, v_ in b.items()})
    if name.startswith("strided"):
        for opts in (dict(num_stages=3), dict(num_stages=1), dict(num_warps=8)):
            try:
                t = bench.time_jax(fb(lambda *a: pallas_gpu.attention(*a, pat, **opts)), q, k, v, g)
                print(f"  {name} {opts}: {t:.3f} ms (default {ms:.3f})", flush=True)
                res[name][str(opts)] = t
            except Exception as e:
                print(name, opts, "FAILED", repr(e)[:300], flush=True)
json.dump(res, open(f"{out}/probe_s6c.json", "w"), indent=1, default=str)
