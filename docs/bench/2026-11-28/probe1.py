"""Device call 1: Mosaic GPU kernel correctness on GPU (fwd, then grads), then timings."""
import functools, json, os, sys, time, traceback
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp, numpy as np
from sparse_lm.attention import PatternSpec, reference_attention, pallas_gpu, mosaic_gpu
from sparse_lm.attention import cudnn as cud
OUT = os.environ["OUT"]
R = {"check": [], "time": [], "err": []}
def save():
    json.dump(R, open(f"{OUT}/probe1.json", "w"), indent=1, default=str)
def rel(a, b):
    a = np.asarray(a, np.float32); b = np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
SPECS = {"dense": PatternSpec("dense"), "local": PatternSpec("local", 128),
         "strided": PatternSpec("strided", 128, combine="merged"),
         "fixed": PatternSpec("fixed", 128, 32, combine="merged"),
         "fixed_mh_distinct": PatternSpec("fixed", 128, 32, combine="multihead", distinct_summaries=True)}
def inputs(shape, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16) for k in ks]
def check(name, d, pv, grads):
    b, t, h = 1, 1024, 4
    q, k, v, g = inputs((b, t, h, d), d + t)
    pat = SPECS[name].layer_pattern(0, h)
    tag = dict(pattern=name, d=d, pv_from_registers=pv, grads=grads)
    try:
        fn = functools.partial(mosaic_gpu.attention, pattern=pat, interpret=False, pv_from_registers=pv)
        f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
        with jax.default_matmul_precision("highest"):
            ro, rvjp = jax.vjp(lambda a, b_, c: reference_attention(a, b_, c, pat), *f32[:3])
            rg = rvjp(f32[3]) if grads else ()
        if grads:
            o, vjp = jax.jit(lambda a, b_, c, gg: (lambda r: (r[0], r[1](gg)))(jax.vjp(fn, a, b_, c)))(q, k, v, g)
            gr = vjp
        else:
            o = jax.jit(fn)(q, k, v); gr = ()
        o = jax.block_until_ready(o)
        errs = [rel(o, ro)] + [rel(a, r_) for a, r_ in zip(gr, rg)]
        nan = bool(any(np.isnan(np.asarray(x, np.float32)).any() for x in (o, *gr)))
        row = dict(tag, errs=errs, nan=nan, ok=(not nan and max(errs) < 1e-2))
    except Exception as e:
        row = dict(tag, ok=False, error=repr(e)[:3000])
        with open(f"{OUT}/tracebacks.txt", "a") as fh:
            fh.write(f"==== {tag}\n{traceback.format_exc()}\n")
    R["check"].append(row); save(); print("check", row, flush=True)
    return row["ok"]
def bench(fn, args, n=30):
    jfn = jax.jit(fn)
    t0 = time.perf_counter(); jax.block_until_ready(jfn(*args)); comp = time.perf_counter() - t0
    for _ in range(3): jax.block_until_ready(jfn(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); jax.block_until_ready(jfn(*args)); ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3), comp
def fb(fwd):
    def f(q, k, v, do):
        o, vjp = jax.vjp(fwd, q, k, v); return o, vjp(do)
    return f
def timeit(shape, impl, name, fwd, do_fb):
    q, k, v, do = inputs(shape, 7)
    row = dict(shape=shape, impl=impl, pattern=name)
    try:
        row["fwd_ms"], row["fwd_compile_s"] = bench(fwd, (q, k, v))
        if do_fb:
            row["fb_ms"], row["fb_compile_s"] = bench(fb(fwd), (q, k, v, do))
    except Exception as e:
        row["error"] = repr(e)[:2000]
        with open(f"{OUT}/tracebacks.txt", "a") as fh:
            fh.write(f"==== time {row}\n{traceback.format_exc()}\n")
    R["time"].append(row); save(); print("time", row, flush=True)
    return row
t0 = time.time()
print(jax.devices(), flush=True)
fwd_ok = {}
for d in (64, 128):
    for pv in (True, False):
        fwd_ok[(d, pv)] = all([check(n, d, pv, False) for n in ("dense", "strided", "fixed")])
print("forward ok", fwd_ok, f"{time.time()-t0:.0f}s", flush=True)
bwd_ok = {}
for d in (64, 128):
    for pv in (True, False):
        if fwd_ok[(d, pv)] or True:
            names = ("dense", "strided", "fixed") + (("fixed_mh_distinct", "local") if d == 64 else ())
            bwd_ok[(d, pv)] = all([check(n, d, pv, True) for n in names])
print("backward ok", bwd_ok, f"{time.time()-t0:.0f}s", flush=True)
anyf = any(fwd_ok.values()); anyb = any(bwd_ok.values())
for shape in [(2, 16384, 8, 64), (2, 16384, 8, 128)]:
    h = shape[2]
    timeit(shape, "cudnn", "dense", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"), True)
    for name in ("strided", "fixed"):
        pat = SPECS[name].layer_pattern(0, h)
        timeit(shape, "triton_v2", name, lambda q, k, v, pat=pat: pallas_gpu.attention(q, k, v, pat), True)
        for pv in (True, False):
            if not fwd_ok.get((shape[3], pv)):
                continue
            for mcs in ((2, 3) if shape[3] == 64 else (2,)):
                for bk in ((64, 128) if shape[3] == 64 else (64, 128)):
                    timeit(shape, f"mosaic_pv{int(pv)}_s{mcs}_bk{bk}", name,
                           lambda q, k, v, pat=pat, pv=pv, mcs=mcs, bk=bk: mosaic_gpu.attention(
                               q, k, v, pat, interpret=False, pv_from_registers=pv,
                               max_concurrent_steps=mcs, block_k=bk),
                           bool(bwd_ok.get((shape[3], pv))) and mcs == 2 and bk == 128)
            if time.time() - t0 > 420: break
        if time.time() - t0 > 420: break
print("\n==== summary", f"{time.time()-t0:.0f}s")
for r in R["check"]:
    print("CHECK", r["pattern"], r["d"], "pv", r["pv_from_registers"], "grads", r["grads"], "ok", r["ok"],
          [f"{e:.1e}" for e in r.get("errs", [])], r.get("error", "")[:150])
for r in R["time"]:
    print("TIME", r["shape"], r["pattern"], r["impl"], r.get("fwd_ms"), r.get("fb_ms"), r.get("error", "")[:150])
