"""Session 10 probe B: strided launch variants (column backward with 4-tile columns, 8 warps
for the column kernel, 128x128 tiles with 8 warps), cuDNN same process, kernel breakdowns.
argv: OUT TAG VARIANT[,...]"""
import dataclasses, json, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu
from sparse_lm import profiling

out, tag, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
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
ORIG_COL, ORIG_MAX = pallas_gpu._column_bwd_call, pallas_gpu.COLUMN_BWD_MAX_TILES
def col_warps(w):
    def call(*a, **kw):
        a = list(a); a[8] = dataclasses.replace(a[8], num_warps=w)
        return ORIG_COL(*a, **kw)
    return call
VARIANTS = {  # name: (options, column-kernel max tiles, column-kernel warps)
    "default": ({}, ORIG_MAX, None),
    "delta": (dict(delta_in_dq=True), ORIG_MAX, None),
    "col4": ({}, 4, None),
    "col4_w8": ({}, 4, 8),
    "col_w8": ({}, ORIG_MAX, 8),
    "b128_w8": (dict(block_q=128, block_k=128, num_warps=8), ORIG_MAX, None),
    "b128_w4": (dict(block_q=128, block_k=128), ORIG_MAX, None),
    "bq128_bk64_w8": (dict(block_q=128, block_k=64, num_warps=8), ORIG_MAX, None),
}
SHAPES = [(2, 16384, 8, 64), (1, 65536, 8, 64)]
res, rows, cud, base, data = {}, [], {}, {}, {}
def dump(): json.dump(res, open(f"{out}/probe_s10b_{tag}.json", "w"), indent=1, default=str)
for shape in SHAPES:
    data = inputs(shape)
    q, k, v, g = data
    cud = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
    pat = PatternSpec("strided", 128 if shape[1] <= 16384 else 256, combine="merged").layer_pattern(0, shape[2])
    for name in names:
        opts, maxt, warps = VARIANTS[name]
        key = f"{shape} {name}"
        pallas_gpu.COLUMN_BWD_MAX_TILES = maxt
        if warps: pallas_gpu._column_bwd_call = col_warps(warps)
        try:
            f = fb(lambda *a: pallas_gpu.attention(*a, pat, **opts)); args = (q, k, v, g)
            tc = time.time(); o = jax.block_until_ready(f(*args)); tc = time.time() - tc
            errs = [round(rel(x, y), 6) for x, y in zip(jax.tree.leaves(o), jax.tree.leaves(base[shape]))] if shape in base else None
            base.setdefault(shape, o)
            nan = any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in jax.tree.leaves(o))
            ms = bench.time_jax(f, *args); ms2 = bench.time_jax(f, *args)
            line = f"| {shape} | {name} | {ms:.3f}/{ms2:.3f} | cuDNN {cud:.3f} | {cud/min(ms, ms2):.2f}x | {errs} | nan={nan} | compile {tc:.0f}s |"
            say(line); rows.append(line)
            res[key] = dict(ms=ms, ms2=ms2, cudnn=cud, errs=errs, nan=nan)
            d = profiling.profile(lambda: f(*args), f"/tmp/trace_{name}_{shape[1]}", steps=5)
            b = profiling.kernel_breakdown(d, steps=5, top=9); res[key]["breakdown"] = b
            print(profiling.format_breakdown(key, b, min(ms, ms2)), flush=True)
        except Exception as e:
            say(key, "FAILED", repr(e)[:800]); res[key] = dict(error=repr(e)[:3000])
        finally:
            pallas_gpu.COLUMN_BWD_MAX_TILES, pallas_gpu._column_bwd_call = ORIG_MAX, ORIG_COL
        dump()
print("| shape | variant | ms (two timings) | cuDNN f+b | ratio | rel err vs default (o, dq, dk, dv) | NaN | compile |")
print("\n".join(rows))
