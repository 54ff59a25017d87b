"""Session 6 probe 4: fixed pattern f+b with add_at_keys (new default) vs the float32
scatter (the old glue, patched back in), cuDNN in the same run; kernel breakdown."""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu
from sparse_lm.attention.part_order import scatter_keys
from sparse_lm import profiling

out = sys.argv[1]
new_add = pallas_gpu.add_at_keys
def old_add(dx, dxg, part):  # the session-5 glue: whole dk converted, scattered in float32
    return scatter_keys(dx.astype(jnp.float32), dxg, part).astype(dx.dtype)

def inputs(shape):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    return [jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in ks]

def fb(attn):
    def f(q, k, v, g):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(g)
    return jax.jit(f)

rows = []
cud = lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)
for shape in ((2, 16384, 8, 64), (2, 16384, 8, 128), (1, 65536, 8, 64), (8, 12288, 8, 64)):
    q, k, v, g = inputs(shape)
    fixed = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, 8)
    res = dict(shape=shape, cudnn=bench.time_jax(fb(cud), q, k, v, g))
    outs = {}
    for name, fn in (("old", old_add), ("new", new_add), ("old2", old_add), ("new2", new_add)):
        pallas_gpu.add_at_keys = fn
        f = fb(lambda *a: pallas_gpu.attention(*a, fixed))
        outs[name] = jax.block_until_ready(f(q, k, v, g))
        res[name] = bench.time_jax(f, q, k, v, g)
        if name == "new" and shape[1] == 16384 and shape[3] == 64:
            d = profiling.profile(lambda: f(q, k, v, g), f"{out}/trace_new", steps=5)
            print(profiling.format_breakdown(f"new {shape}", profiling.kernel_breakdown(d, steps=5, top=12), res[name]), flush=True)
    pallas_gpu.add_at_keys = new_add
    res["same"] = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(outs["old"]), jax.tree.leaves(outs["new"])))
    rows.append(res)
    print(res, flush=True)
json.dump(rows, open(f"{out}/probe_s6d.json", "w"), indent=1)
print("\n| shape | cuDNN f+b | fixed old glue | fixed add_at_keys | x old | x new | bitwise same |")
for r in rows:
    o, n = min(r["old"], r["old2"]), min(r["new"], r["new2"])
    print(f"| {r['shape']} | {r['cudnn']:.3f} | {o:.3f} ({r['old']:.3f}/{r['old2']:.3f}) | {n:.3f} ({r['new']:.3f}/{r['new2']:.3f}) | {r['cudnn']/o:.2f}x | {r['cudnn']/n:.2f}x | {r['same']} |")
