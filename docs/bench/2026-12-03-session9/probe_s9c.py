"""Session 9 probe C: the Mosaic merged forward's launch order: grid (heads, tiles, batch)
reversed (the new default), (heads, batch, tiles) reversed (call 2's), ascending; then f+b
default vs mosaic_forward. Fixed l=128 c=32 merged; cuDNN same run. argv: OUT."""
import json, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu, mosaic_gpu
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
orig_cfg, orig_order = pallas_gpu._mosaic_config, mosaic_gpu._launch_order
def tile_last(work, h, b, axis, heavy):
    grid, names, rev = orig_order(work, h, b, axis, heavy)
    return (h, b, grid[1]), ("heads", "batch", axis), rev
def setup(order):
    pallas_gpu._mosaic_config = orig_cfg; mosaic_gpu._launch_order = orig_order
    if order == "ascending":
        pallas_gpu._mosaic_config = lambda cfg, **o: orig_cfg(cfg, heavy_first=False, **o)
    elif order == "tile_last":
        mosaic_gpu._launch_order = tile_last
res, rows = {}, []
def dump(): json.dump(res, open(f"{out}/probe_s9c.json", "w"), indent=1, default=str)
VARIANTS = [("fwd_mosaic_default", dict(mosaic_forward=True), "default", "fwd"),
            ("fwd_mosaic_tile_last", dict(mosaic_forward=True), "tile_last", "fwd"),
            ("fwd_mosaic_ascending", dict(mosaic_forward=True), "ascending", "fwd"),
            ("fwd_triton", {}, "default", "fwd"),
            ("fb_default", {}, "default", "fb"),
            ("fb_mosaic_forward", dict(mosaic_forward=True), "default", "fb")]
for shape, prof in (((2, 16384, 8, 64), True), ((8, 12288, 8, 64), False), ((1, 65536, 8, 64), False)):
    pat = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, shape[2])
    q, k, v, g = inputs(shape)
    cud = {"fwd": bench.time_jax(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)), q, k, v),
           "fb": bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)}
    base = {}
    for name, opts, order, mode in VARIANTS:
        key = f"{shape} {name}"
        setup(order)
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
            if prof and mode == "fb":
                d = profiling.profile(lambda: f(*args), f"/tmp/trace_{name}", steps=5)
                b = profiling.kernel_breakdown(d, steps=5, top=8); res[key]["breakdown"] = b
                print(profiling.format_breakdown(key, b, min(ms, ms2)), flush=True)
        except Exception as e:
            say(key, "FAILED", repr(e)[:800]); res[key] = dict(error=repr(e)[:3000])
        finally:
            setup("default")
        dump()
print("| shape | variant | ms (two timings) | cuDNN | ratio | rel err vs first of its mode |")
print("\n".join(rows))
