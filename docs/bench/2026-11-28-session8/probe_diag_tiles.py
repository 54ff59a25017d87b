"""Session 8 probe C: diag_bwd launch parameters (pallas_gpu.DIAG_BWD_TILES) at fixed l=128 c=32
merged (2,16384,8,64) and the block-only layer (interleaved layer 0); diag_bwd=False and cuDNN
in the same run; gradients against diag_bwd=False."""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu
from sparse_lm import profiling

out = sys.argv[1]
def inputs(shape):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    return [jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in ks]
def fb(attn):
    def f(q, k, v, g):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(g)
    return jax.jit(f)
def rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
DEFAULT = dict(pallas_gpu.DIAG_BWD_TILES)
VARIANTS = [("off", None), ("q64_k64_w4", dict(block_q=None, max_block_k=64, num_warps=None)),
            ("q64_k64_w8", dict(block_q=None, max_block_k=64, num_warps=8)),
            ("q64_k32_w4", dict(block_q=None, max_block_k=32, num_warps=None)),
            ("q128_k64_w8", dict(block_q=128, max_block_k=64, num_warps=8)),
            ("q128_k64_w4", dict(block_q=128, max_block_k=64, num_warps=None)),
            ("q128_k32_w4", dict(block_q=128, max_block_k=32, num_warps=None))]
shape = (2, 16384, 8, 64)
q, k, v, g = inputs(shape)
cud = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
res, rows = {"cudnn": cud}, []
for combine in ("merged", "interleaved"):
    pat = PatternSpec("fixed", 128, 32, combine=combine).layer_pattern(0, 8)
    base = None
    for name, tiles in VARIANTS:
        key = f"{combine} {name}"
        pallas_gpu.DIAG_BWD_TILES = dict(tiles or DEFAULT)
        opts = dict(diag_bwd=False) if tiles is None else {}
        try:
            f = fb(lambda *a: pallas_gpu.attention(*a, pat, **opts))
            o = jax.block_until_ready(f(q, k, v, g))
            errs = None if base is None else [round(rel(x, y), 6) for x, y in zip(jax.tree.leaves(o), jax.tree.leaves(base))]
            base = o if base is None else base
            ms = bench.time_jax(f, q, k, v, g); ms2 = bench.time_jax(f, q, k, v, g)
            d = profiling.profile(lambda: f(q, k, v, g), f"{out}/trace_{combine}_{name}", steps=5)
            b = profiling.kernel_breakdown(d, steps=5, top=10)
            print(profiling.format_breakdown(key, b, ms), flush=True)
            line = f"| {combine} | {name} | {ms:.3f}/{ms2:.3f} | {cud:.3f} | {cud/min(ms, ms2):.2f}x | {errs} |"
            print(line, flush=True); rows.append(line)
            res[key] = dict(ms=ms, ms2=ms2, errs=errs, breakdown=b)
        except Exception as e:
            print(key, "FAILED", repr(e)[:800], flush=True); res[key] = dict(error=repr(e)[:3000])
pallas_gpu.DIAG_BWD_TILES = DEFAULT
json.dump(res, open(f"{out}/probe_s8c.json", "w"), indent=1, default=str)
print("| layer | diag tiles | f+b ms (two timings) | cuDNN | ratio | rel err vs diag off (o, dq, dk, dv) |")
print("\n".join(rows))
