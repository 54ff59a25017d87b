"""Session 6 probe 2: summary_dkv_block_q=128 on the fixed pattern; strips of 4 tiles;
forward-only breakdown; cuDNN dense causal in the same run."""
import json, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu

def inputs(shape):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    return [jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in ks]

def fb(attn):
    def f(q, k, v, g):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(g)
    return jax.jit(f)

def relerr(out, ref):
    return max(float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))

rows = []
def run(label, shape, f, args, ref=None):
    t0 = time.time()
    try:
        out = jax.block_until_ready(f(*args))
        err = relerr(out, ref) if ref is not None else 0.0
        ms = bench.time_jax(f, *args)
        rows.append(dict(label=label, shape=shape, ms=ms, err=err))
        print(f"{label:28s} {shape} {ms:.3f} ms err={err:.2e} ({time.time()-t0:.0f}s)", flush=True)
        return out
    except Exception as e:
        print(label, shape, "FAILED", repr(e)[:400], flush=True)

cud = lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)
for d in (64, 128):
    shape = (2, 16384, 8, d)
    q, k, v, g = inputs(shape)
    run("cudnn f+b", shape, fb(cud), (q, k, v, g))
    run("cudnn fwd", shape, jax.jit(cud), (q, k, v))
    fixed = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, 8)
    att = lambda **o: (lambda *a: pallas_gpu.attention(*a, fixed, **o))
    ref = run("fixed f+b", shape, fb(att()), (q, k, v, g))
    run("fixed fwd", shape, jax.jit(att()), (q, k, v))
    run("fixed f+b dkv128", shape, fb(att(summary_dkv_block_q=128)), (q, k, v, g), ref)
    if d == 64:
        strided = PatternSpec("strided", 128, combine="merged").layer_pattern(0, 8)
        sat = lambda **o: (lambda *a: pallas_gpu.attention(*a, strided, **o))
        ref = run("strided f+b", shape, fb(sat()), (q, k, v, g))
        run("strided fwd", shape, jax.jit(sat()), (q, k, v))
        local = PatternSpec("local", 128).layer_pattern(0, 8)
        run("local f+b", shape, fb(lambda *a: pallas_gpu.attention(*a, local)), (q, k, v, g))
        run("local fwd", shape, jax.jit(lambda *a: pallas_gpu.attention(*a, local)), (q, k, v))
        pallas_gpu.STRIP_BWD_MAX_TILES = 4
        run("strided f+b strip4tiles", shape, fb(sat(strip_bwd=True)), (q, k, v, g), ref)
        pallas_gpu.STRIP_BWD_MAX_TILES = 8
json.dump(rows, open(sys.argv[1], "w"), indent=1)
print("\n| case | shape | ms | rel err vs default |")
for r in rows:
    print(f"| {r['label']} | {r['shape']} | {r['ms']:.3f} | {r['err']:.1e} |")
