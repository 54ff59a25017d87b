"""Session 7 probe D: fixed l=128 c=32 merged f+b at (1,65536,8,64): default (mosaic_summary_dq
on for merged) vs mosaic_summary_dq=False; cuDNN in the same run."""
import sys
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu
def fb(attn):
    def f(q, k, v, g):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(g)
    return jax.jit(f)
shape = (1, 65536, 8, 64)
ks = jax.random.split(jax.random.PRNGKey(0), 4)
q, k, v, g = (jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in ks)
cud = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
pat = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, 8)
for name, opts in (("default", {}), ("mdq_false", dict(mosaic_summary_dq=False))):
    ms = bench.time_jax(fb(lambda *a: pallas_gpu.attention(*a, pat, **opts)), q, k, v, g)
    print(f"| fixed merged | {shape} | {name} | {ms:.3f} | {cud:.3f} | {cud/ms:.2f}x |", flush=True)
