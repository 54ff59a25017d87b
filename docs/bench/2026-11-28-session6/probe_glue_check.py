"""Session 6 probe 7: GPU check of the new dk/dv glue on every gathered-key layout
(shared summaries: slice path; distinct summaries: scatter path), against the float32
reference and bitwise against the session-5 glue patched back in."""
import sys
import jax, jax.numpy as jnp
from jax import lax
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu, reference_attention
from sparse_lm.attention.part_order import scatter_keys

new_add, new_keys = pallas_gpu.add_at_keys, pallas_gpu.part_keys
def old_add(dx, dxg, part):
    return scatter_keys(dx.astype(jnp.float32), dxg, part).astype(dx.dtype)
def old_keys(x, part):
    if part.k_index is None:
        return new_keys(x, part)
    idx = part.k_index
    if idx.shape[0] == 1:
        return jnp.take(x, jnp.asarray(idx[0]), axis=1)
    return jnp.take_along_axis(x, jnp.asarray(idx.T)[None, :, :, None], axis=1)

ok_all = True
print("| spec | D | dtype | max rel err vs f32 reference | bitwise = old glue | ok |")
for spec, d, dt in ((PatternSpec("fixed", 64, 16, combine="merged"), 64, jnp.bfloat16),
                    (PatternSpec("fixed", 64, 16, combine="merged", distinct_summaries=True), 64, jnp.bfloat16),
                    (PatternSpec("fixed", 64, 16, combine="multihead", distinct_summaries=True), 128, jnp.bfloat16),
                    (PatternSpec("fixed", 64, 16, combine="interleaved"), 64, jnp.bfloat16),
                    (PatternSpec("fixed", 64, 16, combine="merged"), 64, jnp.float32)):
    shape = (1, 4096, 4, d)
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q, k, v, g = (jax.random.normal(x, shape, jnp.float32).astype(dt) for x in ks)
    pat = spec.layer_pattern(0, 4)
    outs = {}
    for name, a, kf in (("new", new_add, new_keys), ("old", old_add, old_keys)):
        pallas_gpu.add_at_keys, pallas_gpu.part_keys = a, kf
        outs[name] = jax.block_until_ready(bench.value_and_grads(lambda *x: pallas_gpu.attention(*x, pat))(q, k, v, g))
    pallas_gpu.add_at_keys, pallas_gpu.part_keys = new_add, new_keys
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    with jax.default_matmul_precision("highest"):
        ref = bench.value_and_grads(lambda *x: reference_attention(*x, pat))(*f32)
    new = jax.tree.leaves(outs["new"])
    errs = [bench.rel_err(a.astype(jnp.float32), r) for a, r in zip(new, jax.tree.leaves(ref))]
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(new, jax.tree.leaves(outs["old"])))
    nan = any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in new)
    ok = same and not nan and max(errs) < (1e-2 if dt == jnp.bfloat16 else 1e-4)
    ok_all &= ok
    print(f"| {spec.name} {spec.combine} distinct={spec.distinct_summaries} | {d} | {jnp.dtype(dt).name} | {max(errs):.2e} | {same} | {ok} |", flush=True)
print("ALL OK" if ok_all else "FAILED")
