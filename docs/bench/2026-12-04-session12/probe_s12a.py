"""Session 12 probe A: the query-major Mosaic dK/dV+dq kernel (MOSAIC_DKVDQ_FORM
"query_major", FA3 layout, 128x128 steps) against the default key-major one. f+b timings,
cuDNN dense causal in the same process, outputs/grads compared with the default variant
of the same pattern. argv: OUT TAG VARIANT[,VARIANT...]"""
import json, os, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu, mosaic_gpu
from sparse_lm import profiling

out, tag, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
t0 = time.time()
def say(*a): print(f"[{time.time()-t0:.0f}s]", *a, flush=True)
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
QM = dict(MOSAIC_DKVDQ_FORM="query_major")
VARIANTS = {  # name: (pattern, attention options, pallas_gpu module overrides)
    "fixed_default": ("fixed", {}, {}),
    "fixed_mf": ("fixed", dict(mosaic_forward=True), {}),
    "fixed_qm": ("fixed", {}, QM),
    "fixed_qm_mf": ("fixed", dict(mosaic_forward=True), QM),
    "fixed_qm_noov": ("fixed", {}, dict(QM, MOSAIC_DKV_OPTIONS=dict(pallas_gpu.MOSAIC_DKV_OPTIONS, overlap_wgmma=False))),
    "fixed_qm_r232": ("fixed", {}, dict(QM, **{"mosaic_gpu.QM_REGISTERS": (232, 40)})),
    "fixed_qm_dsreg": ("fixed", {}, dict(QM, **{"mosaic_gpu.QM_DQ_FROM_REGISTERS": True})),
    "fixed_qm_r232_dsreg": ("fixed", {}, dict(QM, **{"mosaic_gpu.QM_REGISTERS": (232, 40), "mosaic_gpu.QM_DQ_FROM_REGISTERS": True})),
    "fixed_ds1": ("fixed", {}, {"mosaic_gpu.DQ_DS_BUFFERS": 1}),
    "fixed_ds1_mf": ("fixed", dict(mosaic_forward=True), {"mosaic_gpu.DQ_DS_BUFFERS": 1}),
    "fixed_qm_grid": ("fixed", {}, dict(QM, **{"mosaic_gpu.QM_VECTOR_MASKS": False})),
    "il_default": ("fixed_il", {}, {}),
    "il_qm": ("fixed_il", {}, QM),
    "strided_default": ("strided", {}, {}),
    "strided_qm": ("strided", {}, QM),
}
SHAPES = {"fixed": [(2, 16384, 8, 64), (8, 12288, 8, 64), (1, 65536, 8, 64)],
          "strided": [(2, 16384, 8, 64), (1, 65536, 8, 64)],
          "fixed_il": [(2, 16384, 8, 64)]}
if os.environ.get("ONLY16K"):
    SHAPES = {k: v[:1] for k, v in SHAPES.items()}
res, rows, cud, base = {}, [], {}, {}
def dump(): json.dump(res, open(f"{out}/probe_s12a_{tag}.json", "w"), indent=1, default=str)
data = {}
for name in names:
    kind, opts, over = VARIANTS[name]
    for shape in SHAPES[kind]:
        key = f"{shape} {name}"
        if shape not in data:
            data[shape] = inputs(shape)
        q, k, v, g = data[shape]
        if shape not in cud:
            cud[shape] = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
        spec = {"fixed": PatternSpec("fixed", 128, 32, combine="merged"),
                "fixed_il": PatternSpec("fixed", 128, 32, combine="interleaved"),
                "strided": PatternSpec("strided", 128 if shape[1] <= 16384 else 256, combine="merged")}[kind]
        pat = spec.layer_pattern(0, shape[2])
        def where(n): return (mosaic_gpu, n.split(".", 1)[1]) if n.startswith("mosaic_gpu.") else (pallas_gpu, n)
        saved = {n: getattr(*where(n)) for n in over}
        for n, val in over.items(): setattr(*where(n), val)
        try:
            f = fb(lambda *a: pallas_gpu.attention(*a, pat, **opts)); args = (q, k, v, g)
            tc = time.time(); o = jax.block_until_ready(f(*args)); tc = time.time() - tc
            bkey = (shape, kind)
            errs = [round(rel(x, y), 6) for x, y in zip(jax.tree.leaves(o), jax.tree.leaves(base[bkey]))] if bkey in base else None
            base.setdefault(bkey, o)
            nan = any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in jax.tree.leaves(o))
            ms = bench.time_jax(f, *args); ms2 = bench.time_jax(f, *args)
            line = f"| {shape} | {name} | {ms:.3f}/{ms2:.3f} | cuDNN {cud[shape]:.3f} | {cud[shape]/min(ms, ms2):.2f}x | {errs} | nan={nan} | compile {tc:.0f}s |"
            say(line); rows.append(line)
            res[key] = dict(ms=ms, ms2=ms2, cudnn=cud[shape], errs=errs, nan=nan)
            if shape[1] in (16384, 65536) and shape[0] <= 2 and not os.environ.get("NOPROF"):
                d = profiling.profile(lambda: f(*args), f"/tmp/trace_{name}_{shape[1]}", steps=5)
                b = profiling.kernel_breakdown(d, steps=5, top=10); res[key]["breakdown"] = b
                print(profiling.format_breakdown(key, b, min(ms, ms2)), flush=True)
        except Exception as e:
            say(key, "FAILED", repr(e)[:1500]); res[key] = dict(error=repr(e)[:3000])
        finally:
            for n, val in saved.items(): setattr(*where(n), val)
        dump()
print("| shape | variant | ms (two timings) | cuDNN f+b | ratio | rel err vs first of its pattern (o, dq, dk, dv) | NaN | compile |")
print("\n".join(rows))
