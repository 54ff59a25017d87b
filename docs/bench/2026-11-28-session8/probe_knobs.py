"""Session 8 probe A: the Mosaic dK/dV(+dq) kernel's scheduling knobs (pallas_gpu.MOSAIC_DKV_OPTIONS:
overlap_wgmma, max_registers), fixed l=128 c=32 merged f+b at (2,16384,8,64) and (8,12288,8,64),
gradients against the knobs-off default's, per-kernel breakdown of the best; cuDNN in the same run."""
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
KNOBS = (("off", dict(overlap_wgmma=False, max_registers=False)),
         ("regs", dict(overlap_wgmma=False, max_registers=True)),
         ("overlap", dict(overlap_wgmma=True, max_registers=False)),
         ("both", dict(overlap_wgmma=True, max_registers=True)))
pat = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, 8)
res, rows = {}, []
for shape in ((2, 16384, 8, 64), (8, 12288, 8, 64)):
    q, k, v, g = inputs(shape)
    cud = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
    base = None
    for name, knobs in KNOBS:
        key = f"{shape} {name}"
        pallas_gpu.MOSAIC_DKV_OPTIONS = knobs
        try:
            f = fb(lambda *a: pallas_gpu.attention(*a, pat))
            o = jax.block_until_ready(f(q, k, v, g))
            errs = None if base is None else [round(rel(x, y), 6) for x, y in zip(jax.tree.leaves(o), jax.tree.leaves(base))]
            base = o if base is None else base
            ms = bench.time_jax(f, q, k, v, g); ms2 = bench.time_jax(f, q, k, v, g)
            line = f"| {shape} | {name} | {ms:.3f}/{ms2:.3f} | {cud:.3f} | {cud/min(ms, ms2):.2f}x | {errs} |"
            print(line, flush=True); rows.append(line)
            res[key] = dict(ms=ms, ms2=ms2, cudnn=cud, errs=errs)
            if shape[0] == 2:
                d = profiling.profile(lambda: f(q, k, v, g), f"{out}/trace_{name}", steps=5)
                b = profiling.kernel_breakdown(d, steps=5, top=8)
                print(profiling.format_breakdown(key, b, ms), flush=True)
                res[key]["breakdown"] = b
        except Exception as e:
            print(key, "FAILED", repr(e)[:800], flush=True); res[key] = dict(error=repr(e)[:3000])
pallas_gpu.MOSAIC_DKV_OPTIONS = dict(KNOBS[0][1])
json.dump(res, open(f"{out}/probe_s8a.json", "w"), indent=1, default=str)
print("| shape | knobs | f+b ms (two timings) | cuDNN | ratio | rel err vs knobs off (o, dq, dk, dv) |")
print("\n".join(rows))
