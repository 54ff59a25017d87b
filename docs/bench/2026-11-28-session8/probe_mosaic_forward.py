"""Session 8 probe D (last ~100 s of device time): mosaic_forward (Mosaic merged forward, turns on)
against the default (Triton forward), fixed l=128 c=32 merged, (2,16384,8,64); output and grads vs
the default; cuDNN in the same run. Prints each line as soon as it has it."""
import sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu
t0 = time.time()
def rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
def fb(attn):
    def f(q, k, v, g):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(g)
    return jax.jit(f)
shape = (2, 16384, 8, 64)
ks = jax.random.split(jax.random.PRNGKey(0), 4)
q, k, v, g = [jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in ks]
pat = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, 8)
fwd_m = jax.jit(lambda q, k, v: pallas_gpu.attention(q, k, v, pat, mosaic_forward=True))
fwd_d = jax.jit(lambda q, k, v: pallas_gpu.attention(q, k, v, pat))
om = jax.block_until_ready(fwd_m(q, k, v)); od = fwd_d(q, k, v)
print(f"[{time.time()-t0:.0f}s] fwd rel err mosaic vs default {rel(om, od):.2e} finite {bool(jnp.isfinite(om.astype(jnp.float32)).all())}", flush=True)
print(f"[{time.time()-t0:.0f}s] fwd ms: mosaic {bench.time_jax(fwd_m, q, k, v):.3f} default {bench.time_jax(fwd_d, q, k, v):.3f}", flush=True)
fm, fd = fb(lambda *a: pallas_gpu.attention(*a, pat, mosaic_forward=True)), fb(lambda *a: pallas_gpu.attention(*a, pat))
a, b = jax.block_until_ready(fm(q, k, v, g)), fd(q, k, v, g)
print(f"[{time.time()-t0:.0f}s] f+b rel errs {[round(rel(x, y), 6) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]}", flush=True)
cud = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
m, d = bench.time_jax(fm, q, k, v, g), bench.time_jax(fd, q, k, v, g)
print(f"[{time.time()-t0:.0f}s] f+b ms: mosaic_forward {m:.3f} ({cud/m:.2f}x) default {d:.3f} ({cud/d:.2f}x) cuDNN {cud:.3f}", flush=True)
