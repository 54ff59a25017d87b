"""Device call 2: pipelined kernel timings + per-kernel profiles (Triton v2, Mosaic, cuDNN)."""
import json, os, sys, time, traceback
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
import jax, jax.numpy as jnp, numpy as np
from sparse_lm.attention import PatternSpec, pallas_gpu, mosaic_gpu
from sparse_lm import profiling
from bench_attention import time_jax
OUT = os.environ["OUT"]; R = []
def inputs(shape, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16) for k in ks]
def fb(fwd):
    def f(q, k, v, do):
        o, vjp = jax.vjp(fwd, q, k, v); return o, vjp(do)
    return f
SP = {"strided": PatternSpec("strided", 128, combine="merged"), "fixed": PatternSpec("fixed", 128, 32, combine="merged")}
def run(shape, impl, name, fwd, prof=True):
    q, k, v, do = inputs(shape, 3)
    row = dict(shape=shape, impl=impl, pattern=name)
    try:
        f1, f2 = jax.jit(fwd), jax.jit(fb(fwd))
        row["fwd_ms"] = time_jax(f1, q, k, v); row["fb_ms"] = time_jax(f2, q, k, v, do)
        if prof:
            d = f"/tmp/prof/{impl}_{name}_{shape[1]}_{shape[3]}"
            profiling.profile(lambda: f2(q, k, v, do), d, 3)
            b = profiling.kernel_breakdown(d, steps=3, top=12)
            row["profile"] = b
            print(profiling.format_breakdown(f"{impl} {name} {shape} f+b", b, row["fb_ms"]), flush=True)
    except Exception as e:
        row["error"] = repr(e)[:1500]; traceback.print_exc()
    R.append(row); json.dump(R, open(f"{OUT}/probe4.json", "w"), indent=1, default=str)
    print("time", {k: v for k, v in row.items() if k != "profile"}, flush=True)
cud = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
for shape in [(2, 16384, 8, 64), (2, 16384, 8, 128)]:
    run(shape, "cudnn", "dense", cud)
    for n in (("strided", "fixed") if shape[3] == 64 else ("fixed",)):
        pat = SP[n].layer_pattern(0, shape[2])
        run(shape, "triton_v2", n, lambda q, k, v, pat=pat: pallas_gpu.attention(q, k, v, pat))
        run(shape, "mosaic", n, lambda q, k, v, pat=pat: mosaic_gpu.attention(q, k, v, pat, interpret=False, block_k=128))
print("\n==== summary")
for r in R:
    print("TIME", r["shape"], r["pattern"], r["impl"], r.get("fwd_ms"), r.get("fb_ms"), r.get("error", "")[:120])
