"""Session 7 probe A: fixed (l=128, c=32, merged) f+b at (2,16384,8,64) and the enwik8 layer
(8,12288,8,64): default vs mosaic_summary_dkv vs mosaic_summary_dq, per-kernel breakdown,
gradients of each option against the default path's; cuDNN in the same run."""
import json, sys
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

def rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

res = {}
rows = []
for shape in ((2, 16384, 8, 64), (8, 12288, 8, 64)):
    q, k, v, g = inputs(shape)
    cud = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
    for comb in ("merged", "multihead"):
        pat = PatternSpec("fixed", 128, 32, combine=comb).layer_pattern(0, 8)
        base = None
        for name, opts in (("default", {}), ("mdkv", dict(mosaic_summary_dkv=True)), ("mdq", dict(mosaic_summary_dq=True))):
            key = f"{comb} {shape} {name}"
            try:
                f = fb(lambda *a: pallas_gpu.attention(*a, pat, **opts))
                o = jax.block_until_ready(f(q, k, v, g))
                errs = None if base is None else [rel(x, y) for x, y in zip(jax.tree.leaves(o), jax.tree.leaves(base))]
                base = o if base is None else base
                ms = bench.time_jax(f, q, k, v, g)
                ms2 = bench.time_jax(f, q, k, v, g)
                line = f"| {comb} | {shape} | {name} | {ms:.3f}/{ms2:.3f} | {cud:.3f} | {cud/min(ms,ms2):.2f}x | {errs} |"
                print(line, flush=True); rows.append(line)
                res[key] = dict(ms=ms, ms2=ms2, cudnn=cud, errs=errs)
                if comb == "merged":
                    d = profiling.profile(lambda: f(q, k, v, g), f"{out}/trace_{name}_{shape[0]}", steps=5)
                    b = profiling.kernel_breakdown(d, steps=5, top=12)
                    print(profiling.format_breakdown(key, b, ms), flush=True)
                    res[key]["breakdown"] = b
            except Exception as e:
                print(key, "FAILED", repr(e)[:600], flush=True)
                res[key] = dict(error=repr(e)[:2000])
json.dump(res, open(f"{out}/probe_s7a.json", "w"), indent=1, default=str)
print("| pattern | shape | option | f+b ms (two timings) | cuDNN | ratio | rel err vs default (o, dq, dk, dv) |")
print("\n".join(rows))
