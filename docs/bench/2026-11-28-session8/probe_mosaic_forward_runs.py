"""Session 8 probe E: does the Mosaic merged forward run on the GPU? Forward only, turns off then on."""
import sys, time
t0 = time.time()
print("start", flush=True)
import jax, jax.numpy as jnp
from sparse_lm.attention import PatternSpec, pallas_gpu
shape = (2, 16384, 8, 64)
ks = jax.random.split(jax.random.PRNGKey(0), 3)
q, k, v = [jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in ks]
pat = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, 8)
od = jax.block_until_ready(jax.jit(lambda q, k, v: pallas_gpu.attention(q, k, v, pat))(q, k, v))
print(f"[{time.time()-t0:.0f}s] default fwd done", flush=True)
for pp in (False, True):
    pallas_gpu.MOSAIC_FWD_OPTIONS = dict(pingpong=pp, max_concurrent_steps=2, max_registers=True)
    f = jax.jit(lambda q, k, v: pallas_gpu.attention(q, k, v, pat, mosaic_forward=True))
    o = jax.block_until_ready(f(q, k, v))
    err = float(jnp.linalg.norm((o - od).astype(jnp.float32)) / jnp.linalg.norm(od.astype(jnp.float32)))
    t1 = time.perf_counter(); [f(q, k, v) for _ in range(20)]; jax.block_until_ready(f(q, k, v))
    print(f"[{time.time()-t0:.0f}s] pingpong={pp}: rel err vs default {err:.2e}, ~{(time.perf_counter()-t1)/21*1e3:.3f} ms/fwd", flush=True)
t1 = time.perf_counter(); g = jax.jit(lambda q, k, v: pallas_gpu.attention(q, k, v, pat)); [g(q, k, v) for _ in range(20)]; jax.block_until_ready(g(q, k, v))
print(f"[{time.time()-t0:.0f}s] default ~{(time.perf_counter()-t1)/21*1e3:.3f} ms/fwd", flush=True)
