"""Session 7 probe C (after the head-group slicing): fixed l=128 c=32 f+b, multihead and
interleaved (layer 1: the summary part alone) with mosaic_summary_dq None (default) / True /
False, at (2,16384,8,64) and (8,12288,8,64); cuDNN in the same run; breakdown of multihead."""
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
res, rows = {}, []
for shape in ((2, 16384, 8, 64), (8, 12288, 8, 64)):
    q, k, v, g = inputs(shape)
    cud = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
    for comb, layer in (("multihead", 0), ("interleaved", 1)):
        pat = PatternSpec("fixed", 128, 32, combine=comb).layer_pattern(layer, 8)
        for name, opts in (("default", {}), ("mdq_true", dict(mosaic_summary_dq=True)), ("mdq_false", dict(mosaic_summary_dq=False))):
            key = f"{comb}{layer} {shape} {name}"
            try:
                f = fb(lambda *a: pallas_gpu.attention(*a, pat, **opts))
                ms = bench.time_jax(f, q, k, v, g); ms2 = bench.time_jax(f, q, k, v, g)
                line = f"| {comb} layer {layer} | {shape} | {name} | {ms:.3f}/{ms2:.3f} | {cud:.3f} | {cud/min(ms,ms2):.2f}x |"
                print(line, flush=True); rows.append(line)
                res[key] = dict(ms=ms, ms2=ms2, cudnn=cud)
                if comb == "multihead" and name == "default":
                    d = profiling.profile(lambda: f(q, k, v, g), f"{out}/trace_{comb}_{shape[0]}", steps=5)
                    b = profiling.kernel_breakdown(d, steps=5, top=10)
                    print(profiling.format_breakdown(key, b, ms), flush=True)
                    res[key]["breakdown"] = b
            except Exception as e:
                print(key, "FAILED", repr(e)[:600], flush=True); res[key] = dict(error=repr(e)[:2000])
json.dump(res, open(f"{out}/probe_s7c.json", "w"), indent=1, default=str)
print("| pattern | shape | mosaic_summary_dq | f+b ms (two timings) | cuDNN | ratio |")
print("\n".join(rows))
