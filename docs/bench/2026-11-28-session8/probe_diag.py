"""Session 8 probe B: diag_bwd (the block part's dq, dk, dv in one launch, adding the Mosaic
summary dq/dk/dv, writing bf16) against diag_bwd=False, MOSAIC_DKV_OPTIONS both on (the new
default); fixed l=128 c=32 merged / multihead / interleaved layer 0; cuDNN in the same run."""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu
from sparse_lm import profiling

out = sys.argv[1]
print("MOSAIC_DKV_OPTIONS", pallas_gpu.MOSAIC_DKV_OPTIONS, flush=True)
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
CASES = [("merged", 0, (2, 16384, 8, 64), True), ("merged", 0, (8, 12288, 8, 64), False),
         ("multihead", 0, (2, 16384, 8, 64), True), ("interleaved", 0, (2, 16384, 8, 64), False),
         ("merged", 0, (1, 65536, 8, 64), False)]
res, rows = {}, []
for combine, layer, shape, prof in CASES:
    pat = PatternSpec("fixed", 128, 32, combine=combine).layer_pattern(layer, shape[2])
    q, k, v, g = inputs(shape)
    cud = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
    base = None
    for name, opts in (("diag_off", dict(diag_bwd=False)), ("diag_on", {})):
        key = f"{combine} {shape} {name}"
        try:
            f = fb(lambda *a: pallas_gpu.attention(*a, pat, **opts))
            o = jax.block_until_ready(f(q, k, v, g))
            errs = None if base is None else [round(rel(x, y), 6) for x, y in zip(jax.tree.leaves(o), jax.tree.leaves(base))]
            base = o if base is None else base
            ms = bench.time_jax(f, q, k, v, g); ms2 = bench.time_jax(f, q, k, v, g)
            line = f"| {combine} | {shape} | {name} | {ms:.3f}/{ms2:.3f} | {cud:.3f} | {cud/min(ms, ms2):.2f}x | {errs} |"
            print(line, flush=True); rows.append(line)
            res[key] = dict(ms=ms, ms2=ms2, cudnn=cud, errs=errs)
            if prof:
                d = profiling.profile(lambda: f(q, k, v, g), f"{out}/trace_{combine}_{name}", steps=5)
                b = profiling.kernel_breakdown(d, steps=5, top=10)
                print(profiling.format_breakdown(key, b, ms), flush=True)
                res[key]["breakdown"] = b
        except Exception as e:
            print(key, "FAILED", repr(e)[:800], flush=True); res[key] = dict(error=repr(e)[:3000])
json.dump(res, open(f"{out}/probe_s8b.json", "w"), indent=1, default=str)
print("| combine | shape | variant | f+b ms (two timings) | cuDNN | ratio | rel err vs diag off (o, dq, dk, dv) |")
print("\n".join(rows))
