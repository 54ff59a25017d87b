"""One forward+backward of the fixed merged pattern (l=128, c=32) at the shape given as
BxTxHxD, for a profiler to attach to (s16_call4.sh). Copy to .gpu_data/ before the call."""
import sys

import jax
import jax.numpy as jnp

from sparse_lm.attention import PatternSpec, pallas_gpu

b, t, h, d = map(int, sys.argv[1].split("x"))
q, k, v, g = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
              for kk in jax.random.split(jax.random.PRNGKey(0), 4))
pattern = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, h)


@jax.jit
def fb(q, k, v, g):
    o, vjp = jax.vjp(lambda *a: pallas_gpu.attention(*a, pattern), q, k, v)
    return o, vjp(g)


jax.block_until_ready(fb(q, k, v, g))
