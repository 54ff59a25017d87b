"""Session 7 probe B: mosaic_summary_dq's dq reduction schemes. Fixed (l=128, c=32) f+b at
(2,16384,8,64) and (8,12288,8,64), merged and multihead: default vs mdq with one reduction
per step (dq_one_reduction=True, the warpgroups' shares summed in the kernel) vs one per
warpgroup (False), and, for timing only, mdq with the reductions dropped (wrong dq: the
reduction's cost). Gradients against the default path's; cuDNN in the same run."""
import functools, json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu, mosaic_gpu
from sparse_lm import profiling

out = sys.argv[1]
RealCfg, real_plgpu = mosaic_gpu.KernelConfig, mosaic_gpu._plgpu

class NoReduce:  # plgpu with reducing copies dropped (timing only)
    def __getattr__(self, n):
        return getattr(real_plgpu(), n)
    def copy_smem_to_gmem(self, *a, reduction_op=None, **kw):
        if reduction_op is None:
            return real_plgpu().copy_smem_to_gmem(*a, **kw)

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

VARIANTS = (("default", {}, True, False), ("mdkv", dict(mosaic_summary_dkv=True), True, False),
            ("mdq_one", dict(mosaic_summary_dq=True), True, False),
            ("mdq_each", dict(mosaic_summary_dq=True), False, False),
            ("mdq_one_noreduce", dict(mosaic_summary_dq=True), True, True))
res, rows = {}, []
for shape in ((2, 16384, 8, 64), (8, 12288, 8, 64)):
    q, k, v, g = inputs(shape)
    cud = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
    for comb in ("merged", "multihead"):
        pat = PatternSpec("fixed", 128, 32, combine=comb).layer_pattern(0, 8)
        base = None
        for name, opts, one, noreduce in VARIANTS:
            if comb == "multihead" and name in ("mdkv", "mdq_one_noreduce"):
                continue
            key = f"{comb} {shape} {name}"
            mosaic_gpu.KernelConfig = functools.partial(RealCfg, dq_one_reduction=one)
            mosaic_gpu._plgpu = NoReduce if noreduce else real_plgpu
            try:
                f = fb(lambda *a: pallas_gpu.attention(*a, pat, **opts))
                o = jax.block_until_ready(f(q, k, v, g))
                errs = None if base is None else [round(rel(x, y), 6) for x, y in zip(jax.tree.leaves(o), jax.tree.leaves(base))]
                base = o if base is None else base
                ms = bench.time_jax(f, q, k, v, g)
                ms2 = bench.time_jax(f, q, k, v, g)
                line = f"| {comb} | {shape} | {name} | {ms:.3f}/{ms2:.3f} | {cud:.3f} | {cud/min(ms,ms2):.2f}x | {errs} |"
                print(line, flush=True); rows.append(line)
                res[key] = dict(ms=ms, ms2=ms2, cudnn=cud, errs=errs)
                if comb == "merged" and shape[0] == 2 or name == "mdq_one" and shape[0] == 8:
                    d = profiling.profile(lambda: f(q, k, v, g), f"{out}/trace_{comb}_{name}_{shape[0]}", steps=5)
                    b = profiling.kernel_breakdown(d, steps=5, top=10)
                    print(profiling.format_breakdown(key, b, ms), flush=True)
                    res[key]["breakdown"] = b
            except Exception as e:
                print(key, "FAILED", repr(e)[:600], flush=True)
                res[key] = dict(error=repr(e)[:2000])
mosaic_gpu.KernelConfig, mosaic_gpu._plgpu = RealCfg, real_plgpu
json.dump(res, open(f"{out}/probe_s7b.json", "w"), indent=1, default=str)
print("| pattern | shape | option | f+b ms (two timings) | cuDNN | ratio | rel err vs default (o, dq, dk, dv) |")
print("\n".join(rows))
