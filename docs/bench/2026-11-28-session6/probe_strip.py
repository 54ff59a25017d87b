"""Session 6 probe: strip_bwd kernel at 4 vs 8 warps (strip kernel only), cuDNN in the same run."""
import dataclasses, json, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu

orig = pallas_gpu._strip_bwd_call
def strip8(q, k, v, do, lse, delta, init, part, cfg, out_dtype, schedule):
    return orig(q, k, v, do, lse, delta, init, part, dataclasses.replace(cfg, num_warps=8), out_dtype, schedule)

rows = []
for shape, l in (((2, 16384, 8, 64), 128), ((1, 65536, 8, 64), 256)):
    pat = PatternSpec("strided", l, combine="merged").layer_pattern(0, shape[2])
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, g = (jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in ks)
    def fb(**opts):
        def f(q, k, v, g):
            o, vjp = jax.vjp(lambda *a: pallas_gpu.attention(*a, pat, **opts), q, k, v)
            return o, vjp(g)
        return jax.jit(f)
    def cudnn(q, k, v, g):
        o, vjp = jax.vjp(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True), q, k, v)
        return o, vjp(g)
    res = {}
    ref = None
    for name, opts, patch in (("default", {}, False), ("strip4", {"strip_bwd": True}, False),
                              ("strip8", {"strip_bwd": True}, True)):
        pallas_gpu._strip_bwd_call = strip8 if patch else orig
        t0 = time.time()
        try:
            f = fb(**opts)
            out = jax.block_until_ready(f(q, k, v, g))
            if ref is None:
                ref = out
            err = max(float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
                      for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
            ms = bench.time_jax(f, q, k, v, g)
            res[name] = ms
            print(name, shape, f"{ms:.3f} ms err_vs_default={err:.2e} compile+run {time.time()-t0:.1f}s", flush=True)
        except Exception as e:
            print(name, shape, "FAILED", repr(e)[:400], flush=True)
    pallas_gpu._strip_bwd_call = orig
    res["cudnn"] = bench.time_jax(jax.jit(cudnn), q, k, v, g)
    rows.append(dict(shape=shape, l=l, **res))
    print(rows[-1], flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
print("\n| shape | default | strip 4w | strip 8w | cuDNN | x default | x strip4 | x strip8 |")
for r in rows:
    c = r["cudnn"]
    print(f"| {r['shape']} | " + " | ".join(f"{r.get(n, float('nan')):.3f}" for n in ("default", "strip4", "strip8", "cudnn"))
          + " | " + " | ".join(f"{c / r[n]:.2f}x" if n in r else "-" for n in ("default", "strip4", "strip8")) + " |")
