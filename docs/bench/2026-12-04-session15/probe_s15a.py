"""Session 15 probe A: forward-kernel variants of the fixed merged pattern (FFMA-folded
scale in both forwards; Mosaic merged forward with 3 slots, intra-warpgroup overlap,
with/without pingpong). Forward-only and f+b timings, cuDNN in the same process, errors
against the first variant of the same pattern. argv: OUT TAG VARIANT[,VARIANT...]"""
import json, os, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu, mosaic_gpu

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
F = getattr(pallas_gpu, "MOSAIC_FWD_OPTIONS", {})
def fwd_opts(**kw): return {"MOSAIC_FWD_OPTIONS": dict(F, **kw)}
VARIANTS = {  # name: (pattern, attention options, pallas_gpu overrides)
    "fixed_default": ("fixed", {}, {}),
    "fixed_mf": ("fixed", dict(mosaic_forward=True), {}),
    "fixed_mf3": ("fixed", dict(mosaic_forward=True), fwd_opts(max_concurrent_steps=3)),
    "fixed_mf_ov": ("fixed", dict(mosaic_forward=True), fwd_opts(overlap=True, max_concurrent_steps=3)),
    "fixed_mf_ov4": ("fixed", dict(mosaic_forward=True), fwd_opts(overlap=True, max_concurrent_steps=4)),
    "fixed_mf_ov_nopp": ("fixed", dict(mosaic_forward=True), fwd_opts(overlap=True, pingpong=False, max_concurrent_steps=3)),
    "fixed_mf_nopp": ("fixed", dict(mosaic_forward=True), fwd_opts(pingpong=False)),
    "fixed_mf_pers": ("fixed", dict(mosaic_forward=True), fwd_opts(persistent=True)),
    "fixed_mf_pers3": ("fixed", dict(mosaic_forward=True), fwd_opts(persistent=True, max_concurrent_steps=3)),
    "fixed_mf_pers_nopp": ("fixed", dict(mosaic_forward=True), fwd_opts(persistent=True, pingpong=False)),
    "strided_default": ("strided", {}, {}),
}
SHAPES = {"fixed": [(2, 16384, 8, 64), (8, 12288, 8, 64)] + ([(1, 65536, 8, 64)] if os.environ.get("LONG") else []),
          "strided": [(2, 16384, 8, 64), (1, 65536, 8, 64)]}
res, rows, cud, cudf, base = {}, [], {}, {}, {}
def dump(): json.dump(res, open(f"{out}/probe_s15a_{tag}.json", "w"), indent=1, default=str)
data = {}
for name in names:
    kind, opts, over = VARIANTS[name]
    for shape in SHAPES[kind]:
        key = f"{shape} {name}"
        if shape not in data:
            data[shape] = inputs(shape)
        q, k, v, g = data[shape]
        if shape not in cud:
            dense = lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)
            cud[shape] = bench.time_jax(fb(dense), q, k, v, g)
            cudf[shape] = bench.time_jax(jax.jit(dense), q, k, v)
        spec = {"fixed": PatternSpec("fixed", 128, 32, combine="merged"),
                "strided": PatternSpec("strided", 128 if shape[1] <= 16384 else 256, combine="merged")}[kind]
        pat = spec.layer_pattern(0, shape[2])
        saved = {n: getattr(pallas_gpu, n) for n in over}
        for n, val in over.items(): setattr(pallas_gpu, n, val)
        try:
            attn = lambda *a: pallas_gpu.attention(*a, pat, **opts)
            f = fb(attn); ff = jax.jit(attn)
            tc = time.time(); o = jax.block_until_ready(f(q, k, v, g)); tc = time.time() - tc
            bkey = (shape, kind)
            errs = [round(rel(x, y), 6) for x, y in zip(jax.tree.leaves(o), jax.tree.leaves(base[bkey]))] if bkey in base else None
            base.setdefault(bkey, o)
            nan = any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in jax.tree.leaves(o))
            fw = bench.time_jax(ff, q, k, v); fw2 = bench.time_jax(ff, q, k, v)
            ms = bench.time_jax(f, q, k, v, g); ms2 = bench.time_jax(f, q, k, v, g)
            line = (f"| {shape} | {name} | fwd {fw:.3f}/{fw2:.3f} (cuDNN {cudf[shape]:.3f}) | f+b {ms:.3f}/{ms2:.3f} "
                    f"(cuDNN {cud[shape]:.3f}, {cud[shape]/min(ms, ms2):.2f}x) | {errs} | nan={nan} | compile {tc:.0f}s |")
            say(line); rows.append(line)
            res[key] = dict(fwd=[fw, fw2], fb=[ms, ms2], cudnn_fb=cud[shape], cudnn_fwd=cudf[shape], errs=errs, nan=nan)
        except Exception as e:
            say(key, "FAILED", repr(e)[:1500]); res[key] = dict(error=repr(e)[:3000])
        finally:
            for n, val in saved.items(): setattr(pallas_gpu, n, val)
        dump()
print("| shape | variant | fwd ms | f+b ms | rel err vs first of its pattern (o, dq, dk, dv) | NaN | compile |")
print("\n".join(rows))
