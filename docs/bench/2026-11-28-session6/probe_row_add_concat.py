"""Session 6 probe 6: the fixed pattern's dk/dv row add as a slice update (current) vs a
concatenate (one fusion writing the whole array), cuDNN in the same run."""
import sys
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu
from sparse_lm.attention import part_order

cur = pallas_gpu.add_at_keys
def concat_add(dx, dxg, part):
    sl = part_order.summary_slice(part)
    if sl is None:
        return cur(dx, dxg, part)
    l, lo, c = sl
    t = dx.shape[1]
    b = part_order._blocks(dx, l)
    g = dxg[:, : t // l * c].reshape(b.shape[:2] + (c,) + b.shape[3:])
    new = (b[:, :, lo:lo + c].astype(jnp.float32) + g).astype(dx.dtype)
    return jnp.concatenate([b[:, :, :lo], new, b[:, :, lo + c:]], axis=2).reshape(dx.shape)

def fb(attn):
    def f(q, k, v, g):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(g)
    return jax.jit(f)

cud = lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)
print("| shape | cuDNN | slice update | concatenate | same |")
for shape in ((2, 16384, 8, 64), (8, 12288, 8, 64)):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, g = (jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in ks)
    fixed = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, 8)
    r, outs = {}, {}
    for name, fn in (("dus", cur), ("cat", concat_add), ("dus2", cur), ("cat2", concat_add)):
        pallas_gpu.add_at_keys = fn
        f = fb(lambda *a: pallas_gpu.attention(*a, fixed))
        outs[name] = jax.block_until_ready(f(q, k, v, g))
        r[name] = bench.time_jax(f, q, k, v, g)
    pallas_gpu.add_at_keys = cur
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(outs["dus"]), jax.tree.leaves(outs["cat"])))
    c = bench.time_jax(fb(cud), q, k, v, g)
    print(f"| {shape} | {c:.3f} | {r['dus']:.3f}/{r['dus2']:.3f} ({c/min(r['dus'],r['dus2']):.2f}x) | {r['cat']:.3f}/{r['cat2']:.3f} ({c/min(r['cat'],r['cat2']):.2f}x) | {same} |", flush=True)
