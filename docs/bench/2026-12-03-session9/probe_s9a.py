"""Session 9 probe A. Stages (argv[1]):
  fwd_nopp / fwd_pp : mosaic_forward (the Mosaic merged forward) forward only, turns off / on,
                      against the default Triton forward at (2,16384,8,64) and (8,12288,8,64).
  dkv              : the Mosaic dK/dV+dq kernel with 2 vs 3 pipeline slots; defaults vs
                      diag_bwd=False; mosaic_forward f+b (if argv[3] == 'mf'); cuDNN same run.
Writes JSON to argv[2]/probe_<stage>.json after every case."""
import json, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_attention as bench
from sparse_lm.attention import PatternSpec, pallas_gpu
from sparse_lm import profiling

stage, out = sys.argv[1], sys.argv[2]
mf = len(sys.argv) > 3 and sys.argv[3] == "mf"
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
res, rows = {}, []
def dump(): json.dump(res, open(f"{out}/probe_{stage}.json", "w"), indent=1, default=str)
orig_cfg = pallas_gpu._mosaic_config

if stage.startswith("fwd"):
    pallas_gpu.MOSAIC_FWD_OPTIONS = dict(pingpong=stage == "fwd_pp", max_concurrent_steps=2, max_registers=True)
    for shape in ((2, 16384, 8, 64), (8, 12288, 8, 64)):
        pat = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, shape[2])
        q, k, v, g = inputs(shape)
        cud = bench.time_jax(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)), q, k, v)
        fd = jax.jit(lambda q, k, v: pallas_gpu.attention(q, k, v, pat))
        od = jax.block_until_ready(fd(q, k, v)); say(shape, "default fwd compiled")
        fm = jax.jit(lambda q, k, v: pallas_gpu.attention(q, k, v, pat, mosaic_forward=True))
        om = jax.block_until_ready(fm(q, k, v)); say(shape, "mosaic fwd ran")
        err = rel(om, od)
        td, tm = bench.time_jax(fd, q, k, v), bench.time_jax(fm, q, k, v)
        td2, tm2 = bench.time_jax(fd, q, k, v), bench.time_jax(fm, q, k, v)
        line = f"| {stage} | {shape} | default {td:.3f}/{td2:.3f} | mosaic {tm:.3f}/{tm2:.3f} | cuDNN fwd {cud:.3f} | err {err:.2e} |"
        say(line); rows.append(line)
        res[str(shape)] = dict(default=[td, td2], mosaic=[tm, tm2], cudnn_fwd=cud, err=err)
        if shape[0] == 2:
            d = profiling.profile(lambda: fm(q, k, v), f"{out}/trace_{stage}", steps=5)
            b = profiling.kernel_breakdown(d, steps=5, top=6); res[str(shape)]["breakdown"] = b
            print(profiling.format_breakdown(f"{stage} mosaic fwd", b, min(tm, tm2)), flush=True)
        dump()
else:
    variants = [("default", {}, 2), ("slots3", {}, 3), ("diag_off", dict(diag_bwd=False), 2)]
    if mf:
        variants += [("mosaic_fwd", dict(mosaic_forward=True), 2)]
    for shape, prof in (((2, 16384, 8, 64), True), ((8, 12288, 8, 64), False), ((1, 65536, 8, 64), False)):
        pat = PatternSpec("fixed", 128, 32, combine="merged").layer_pattern(0, shape[2])
        q, k, v, g = inputs(shape)
        cud = bench.time_jax(fb(lambda *a: jax.nn.dot_product_attention(*a, implementation="cudnn", is_causal=True)), q, k, v, g)
        base = None
        for name, opts, slots in variants:
            key = f"{shape} {name}"
            def cfgp(cfg, **o):
                if "max_concurrent_steps" in o and "pingpong" not in o and o.get("overlap_wgmma") is not None:
                    o["max_concurrent_steps"] = slots
                return orig_cfg(cfg, **o)
            pallas_gpu._mosaic_config = cfgp
            try:
                f = fb(lambda *a: pallas_gpu.attention(*a, pat, **opts))
                o = jax.block_until_ready(f(q, k, v, g))
                errs = None if base is None else [round(rel(x, y), 6) for x, y in zip(jax.tree.leaves(o), jax.tree.leaves(base))]
                base = o if base is None else base
                ms = bench.time_jax(f, q, k, v, g); ms2 = bench.time_jax(f, q, k, v, g)
                line = f"| {shape} | {name} | {ms:.3f}/{ms2:.3f} | {cud:.3f} | {cud/min(ms, ms2):.2f}x | {errs} |"
                say(line); rows.append(line)
                res[key] = dict(ms=ms, ms2=ms2, cudnn=cud, errs=errs)
                if prof:
                    d = profiling.profile(lambda: f(q, k, v, g), f"{out}/trace_{name}", steps=5)
                    b = profiling.kernel_breakdown(d, steps=5, top=8); res[key]["breakdown"] = b
                    print(profiling.format_breakdown(key, b, min(ms, ms2)), flush=True)
            except Exception as e:
                say(key, "FAILED", repr(e)[:800]); res[key] = dict(error=repr(e)[:3000])
            finally:
                pallas_gpu._mosaic_config = orig_cfg
            dump()
print("\n".join(rows))
