"""Session 9 probe B: launch order of the Mosaic kernels (heavy_first: tile axis last, from
the heavy end) on/off; mosaic_forward f+b. Fixed l=128 c=32 merged; cuDNN same run.
argv: OUT. JSON to OUT/probe_s9b.json after each case."""
import json, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu
from sparse_lm import profiling

out = sys.argv[1]
t0 = time.time()
def say(*a): print(f"[{time.time()-t0:.0f}s]", *a, flush=True)
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
orig_cfg = pallas_gpu._mosaic_config
def heavy(on):
    pallas_gpu._mosaic_config = lambda cfg, **o: orig_cfg(cfg, heavy_first=on, **o)
res, rows = {}, []
def dump(): json.dump(res, open(f"{out}/probe_s9b.json", "w"), indent=1, default=str)
# (name, opts, heavy_first, mode)
VARIANTS = [("fwd_mosaic_heavy_off", dict(mosaic_forward=True), False, "fwd"),
            ("fwd_mosaic_heavy_on", dict(mosaic_forward=True), True, "fwd"),
            ("fwd_triton", {}, True, "fwd"),
            ("fb_default_heavy_off", {}, False, "fb"),
            ("fb_default_heavy_on", {}, True, "fb"),
            ("fb_mosaic_fwd_heavy_on", dict(mosaic_forward=True), True, "fb")]
for shape, prof in (((2, 16384, 8, 64), True), ((8, 12288, 8, 64), False), ((1, 65536, 8, 64), False)):
    pat = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, shape[2])
    q, k, v, g = inputs(shape)
    cud = {"fwd": bench.time_jax(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)), q, k, v),
           "fb": bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)}
    base = {}
    for name, opts, on, mode in VARIANTS:
        key = f"{shape} {name}"
        heavy(on)
        try:
            if mode == "fwd":
                f = jax.jit(lambda q, k, v: pallas_gpu.attention(q, k, v, pat, **opts)); args = (q, k, v)
            else:
                f = fb(lambda *a: pallas_gpu.attention(*a, pat, **opts)); args = (q, k, v, g)
            o = jax.block_until_ready(f(*args))
            errs = [round(rel(x, y), 6) for x, y in zip(jax.tree.leaves(o), jax.tree.leaves(base[mode]))] if mode in base else None
            base.setdefault(mode, o)
            ms = bench.time_jax(f, *args); ms2 = bench.time_jax(f, *args)
            line = f"| {shape} | {name} | {ms:.3f}/{ms2:.3f} | cuDNN {mode} {cud[mode]:.3f} | {cud[mode]/min(ms, ms2):.2f}x | {errs} |"
            say(line); rows.append(line)
            res[key] = dict(ms=ms, ms2=ms2, cudnn=cud[mode], errs=errs)
            if prof and mode == "fb" or (prof and name == "fwd_mosaic_heavy_on"):
                d = profiling.profile(lambda: f(*args), f"{out}/trace_{name}", steps=5)
                b = profiling.kernel_breakdown(d, steps=5, top=8); res[key]["breakdown"] = b
                print(profiling.format_breakdown(key, b, min(ms, ms2)), flush=True)
        except Exception as e:
            say(key, "FAILED", repr(e)[:800]); res[key] = dict(error=repr(e)[:3000])
        finally:
            pallas_gpu._mosaic_config = orig_cfg
        dump()
print("| shape | variant | ms (two timings) | cuDNN | ratio | rel err vs first of its mode |")
print("\n".join(rows))
