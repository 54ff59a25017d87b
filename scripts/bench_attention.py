"""Benchmark the block-sparse Pallas attention kernel against dense and sparse peers (GPU).

Usage: python3 scripts/bench_attention.py OUT.json [--quick] [--skip-check] [--variants]

In one process: (1) a correctness check of impl="pallas_gpu" against the reference on
the GPU (output and q/k/v gradients, bf16 and float32, every pattern); (2) forward and
forward+backward times (median over repeats after warm-up) at the issue's shapes for
our kernel (strided, fixed l=128 c=32 merged, local), cuDNN dense causal, JAX's Pallas
``mha`` causal, and, where torch imports, FlexAttention with the same masks, as written
and (strided) in the permuted, log-sum-exp-merged form; plus the largest error of our
output against FlexAttention's on identical inputs. Effective TFLOP/s counts 4*D FLOPs
per allowed (query, key) pair forward and 3.5 times that forward+backward. Prints a table
last and writes everything to OUT.json.

The kernel's default path is v2 (``fuse_parts=True``: strided parts through BlockSpecs
on the free [B, T/l, l, H, D] view, parts chained in one online-softmax state, no
log-sum-exp merge); its rows record whether the v2 kernels were really used
(``fused_taken``: False means the group fell back to v1). ``--variants`` also checks and
times the v1 path (``fuse_parts=False``: permuted copies, XLA merge) in the same run, as
rows ``ours_<bq>x<bk>_v1``. ``--mosaic`` adds the experimental Mosaic GPU kernel
(``sparse_lm/attention/mosaic_gpu.py``, bf16 only) to the check and the timings, as rows
``ours_mosaic``. ``--split-launch`` adds the fixed pattern with ``colaunch=False`` (one
launch per part, rows ``ours_<bq>x<bk>_splitlaunch``); ``--wide-chain`` float32 partial
results between launches (``narrow_chain=False``, rows ``_f32chain``, strided and fixed);
``--split-bwd`` a strided part's dq and dk, dv from separate kernels (``column_bwd=False``,
rows ``_splitbwd``, strided; the default computes them in one kernel per column where it
applies); ``--summary-dkv-128`` the fixed pattern's summary dK/dV kernel at 128-row
query tiles (``summary_dkv_block_q=128``, rows ``_sdkv128``);
``--mosaic-summary-dkv`` the fixed pattern's summary dK/dV from the Mosaic GPU kernel
(``mosaic_summary_dkv=True, mosaic_summary_dq=False``, rows ``_mosaicdkv``; bf16 at
D=64); ``--mosaic-summary-dq`` that kernel also emitting dq for every head group
(``mosaic_summary_dq=True``, rows ``_mosaicdq``; the default does so for merged groups
only); ``--no-mosaic-dq`` the summary dK/dV and dq from Triton's kernels
(``mosaic_summary_dq=False``, rows ``_nomdq``: the default before session 7, with
reproducible dq). ``--mosaic-forward`` merged fixed heads' forward from the Mosaic GPU
kernel (``mosaic_forward=True``, rows ``_mosaicfwd``; bf16), ``--mosaic-forward-persistent``
that kernel as one program per SM (``mosaic_forward_persistent=True``, rows
``_mosaicfwdpers``; bf16 at D=64), ``--mosaic-dkvdq-persistent`` the summary dK/dV+dq
kernel likewise (``mosaic_dkvdq_persistent=True``, rows ``_dkvdqpers``), ``--persistent``
both (rows ``_persistent``). ``--shapes 1x65536x8x64,...`` picks shapes (B x T x H x D).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import os
import signal
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparse_lm.attention import PatternSpec, allowed_pairs, reference_attention  # noqa: E402
from sparse_lm.attention import pallas_gpu  # noqa: E402
from sparse_lm.attention.layout import build_layout  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
RESULTS: dict = {"check": [], "timings": [], "errors": [], "layout": []}

# (impl-name suffix, extra pallas_gpu.attention options) of the kernel paths to time.
DEFAULT_VARIANT = ("", {})  # v2, fuse_parts=True
V1_VARIANT = ("_v1", {"fuse_parts": False})
# The experimental Mosaic GPU kernel (sparse_lm/attention/mosaic_gpu.py), at its own tiles.
MOSAIC_VARIANT = ("_mosaic", {"kernel": "mosaic_gpu"})
# The fixed pattern's parts one launch each (the default co-launches them).
SPLIT_LAUNCH_VARIANT = ("_splitlaunch", {"colaunch": False})
# The fixed pattern's summary dK/dV kernel at 128-row query tiles, the others at 64.
SUMMARY_DKV_128_VARIANT = ("_sdkv128", {"summary_dkv_block_q": 128})
# The fixed pattern's summary dK/dV from the Mosaic GPU kernel inside the Triton chain
# (its dq from Triton's dQ kernel).
MOSAIC_DKV_VARIANT = ("_mosaicdkv", {"mosaic_summary_dkv": True, "mosaic_summary_dq": False})
# ... and the summary part's dq from that kernel too, by TMA bulk-add reductions, for
# every head group (the default: merged groups only).
MOSAIC_DQ_VARIANT = ("_mosaicdq", {"mosaic_summary_dq": True})
# The summary part's dK/dV and dq from Triton's kernels (reproducible dq; the default
# before session 7).
NO_MOSAIC_DQ_VARIANT = ("_nomdq", {"mosaic_summary_dq": False})
# Merged fixed heads' forward from the Mosaic GPU kernel, one program per query tile, or
# persistent (one program per SM walking the tiles).
MOSAIC_FWD_VARIANT = ("_mosaicfwd", {"mosaic_forward": True})
MOSAIC_FWD_PERSISTENT_VARIANT = ("_mosaicfwdpers", {"mosaic_forward": True,
                                                    "mosaic_forward_persistent": True})
# The summary dK/dV+dq kernel as one program per SM walking the key tiles.
MOSAIC_DKVDQ_PERSISTENT_VARIANT = ("_dkvdqpers", {"mosaic_dkvdq_persistent": True})
# Both persistent forms together.
PERSISTENT_VARIANT = ("_persistent", {"mosaic_forward": True, "mosaic_forward_persistent": True,
                                      "mosaic_dkvdq_persistent": True})
FIXED_ONLY = {"_splitlaunch", "_sdkv128", "_mosaicdkv", "_mosaicdq", "_nomdq", "_mosaicfwd",
              "_mosaicfwdpers", "_dkvdqpers", "_persistent"}  # same kernels elsewhere
# Partial results between launches in float32 (the default: the input dtype): patterns
# of several parts only.
WIDE_CHAIN_VARIANT = ("_f32chain", {"narrow_chain": False})
# A strided part's dq and dk, dv from separate kernels (the default: one kernel per
# column where it applies; strided pattern only).
SPLIT_BWD_VARIANT = ("_splitbwd", {"column_bwd": False})
SHAPES = [(2, 16384, 8, 64), (1, 65536, 8, 64), (2, 16384, 8, 128)]


# Kernel paths a flag adds beside the default, by the flag's name.
EXTRA_VARIANTS = {"v1": [V1_VARIANT], "mosaic": [MOSAIC_VARIANT],
                  "split_launch": [SPLIT_LAUNCH_VARIANT], "wide_chain": [WIDE_CHAIN_VARIANT],
                  "split_bwd": [SPLIT_BWD_VARIANT],
                  "summary_dkv_128": [SUMMARY_DKV_128_VARIANT],
                  "mosaic_summary_dkv": [MOSAIC_DKV_VARIANT],
                  "mosaic_summary_dq": [MOSAIC_DQ_VARIANT],
                  "no_mosaic_dq": [NO_MOSAIC_DQ_VARIANT],
                  "mosaic_forward": [MOSAIC_FWD_VARIANT],
                  "mosaic_forward_persistent": [MOSAIC_FWD_PERSISTENT_VARIANT],
                  "mosaic_dkvdq_persistent": [MOSAIC_DKVDQ_PERSISTENT_VARIANT],
                  "persistent": [PERSISTENT_VARIANT]}


# The flag that adds each of EXTRA_VARIANTS to the check and the timings (argparse names
# its attribute after the flag; extra_variants reads it), and its help.
VARIANT_FLAGS = {
    "v1": ("--variants",
           "also check and time the v1 path (fuse_parts=False) beside the default v2"),
    "mosaic": ("--mosaic",
               "also check and time the experimental Mosaic GPU kernel (rows ours_mosaic)"),
    "split_launch": ("--split-launch",
                     "also check and time colaunch=False (one launch per part) for the fixed "
                     "pattern"),
    "split_bwd": ("--split-bwd",
                  "also check and time column_bwd=False (a strided part's dq and dk, dv from "
                  "separate kernels, not one kernel per column) for the strided pattern"),
    "summary_dkv_128": ("--summary-dkv-128",
                        "also check and time summary_dkv_block_q=128 (the summary dK/dV kernel at "
                        "128-row query tiles) for the fixed pattern"),
    "mosaic_summary_dkv": ("--mosaic-summary-dkv",
                           "also check and time mosaic_summary_dkv=True (the summary dK/dV from "
                           "the Mosaic GPU kernel; bf16 at D=64) for the fixed pattern"),
    "mosaic_summary_dq": ("--mosaic-summary-dq",
                          "also check and time mosaic_summary_dq=True (the summary dK/dV and dq "
                          "from the Mosaic GPU kernel, dq by TMA reductions; bf16 at D=64) for "
                          "the fixed pattern"),
    "no_mosaic_dq": ("--no-mosaic-dq",
                     "also check and time mosaic_summary_dq=False (the summary dK/dV and dq from "
                     "Triton's kernels, reproducible dq) for the fixed pattern"),
    "mosaic_forward": ("--mosaic-forward",
                       "also check and time mosaic_forward=True (merged fixed heads' forward from "
                       "the Mosaic GPU kernel; bf16) for the fixed pattern"),
    "mosaic_forward_persistent": ("--mosaic-forward-persistent",
                                  "also check and time mosaic_forward_persistent=True (that "
                                  "kernel as one program per SM walking the query tiles; bf16, "
                                  "D=64) for the fixed pattern"),
    "mosaic_dkvdq_persistent": ("--mosaic-dkvdq-persistent",
                                "also check and time mosaic_dkvdq_persistent=True (the summary "
                                "dK/dV+dq kernel as one program per SM; bf16, D=64) for the fixed "
                                "pattern"),
    "persistent": ("--persistent",
                   "also check and time both persistent kernels together (the Mosaic forward and "
                   "the dK/dV+dq kernel) for the fixed pattern"),
    "wide_chain": ("--wide-chain",
                   "also check and time narrow_chain=False (float32 partial results) for strided "
                   "and fixed"),
}


def variants(extra: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """The default path, then those of ``extra`` (names of EXTRA_VARIANTS) in that order."""
    return [DEFAULT_VARIANT] + [var for name in extra for var in EXTRA_VARIANTS[name]]


def applies(suffix: str, pattern: str, dtype) -> bool:
    """Whether a variant is worth checking/timing for a pattern and dtype: the fixed-only
    options change nothing elsewhere, and wgmma takes half precision only on the GPU."""
    if suffix in FIXED_ONLY:
        return pattern == "fixed"
    if suffix == SPLIT_BWD_VARIANT[0]:
        return pattern == "strided"
    if suffix == WIDE_CHAIN_VARIANT[0]:
        return pattern in ("strided", "fixed")
    return suffix != "_mosaic" or jnp.dtype(dtype) != jnp.float32


def kernel_fn(opts: dict):
    """The kernel a variant names (``kernel``: pallas_gpu by default) with its options."""
    opts = dict(opts)
    if opts.pop("kernel", "pallas_gpu") == "mosaic_gpu":
        from sparse_lm.attention import mosaic_gpu

        return functools.partial(mosaic_gpu.attention, **opts)
    return functools.partial(pallas_gpu.attention, **opts)


def _dims_list(text: str, n: int, what: str) -> list[tuple[int, ...]]:
    """'AxB,CxD' -> [(A, B), (C, D)], each item ``n`` integers joined by 'x'."""
    out = []
    for item in filter(None, text.split(",")):
        dims = item.lower().split("x")
        if len(dims) != n or not all(x.isdigit() for x in dims):
            raise argparse.ArgumentTypeError(f"{item!r} is not {what}")
        out.append(tuple(int(x) for x in dims))
    return out


def parse_blocks(text: str) -> list[tuple[int, int]]:
    """'64x64,32x32' -> [(64, 64), (32, 32)] (block_q x block_k)."""
    return _dims_list(text, 2, "a tile QxK, e.g. 64x64")


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """'2x16384x8x64,1x65536x8x64' -> [(2, 16384, 8, 64), (1, 65536, 8, 64)]."""
    return _dims_list(text, 4, "a shape BxTxHxD (four integers joined by 'x', e.g. 1x65536x8x64)")


@functools.lru_cache(maxsize=None)
def kernels_run(spec: PatternSpec, shape: tuple, block_q: int | None = None,
                block_k: int | None = None, names: str = r"sparse_attn\w*", layer: int = 0,
                **opts) -> set[str]:
    """Names of the kernels a forward+backward of ``layer`` launches here (traced, not
    run; ``names`` the pattern of the names to find)."""
    pat = spec.layer_pattern(layer, shape[2])
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)

    def f(q, k, v):
        o, vjp = jax.vjp(lambda *a: pallas_gpu.attention(
            *a, pat, block_q=block_q, block_k=block_k, **opts), q, k, v)
        return o, vjp(o)

    # (name=... of pallas_call; kernel_name='...' of a Mosaic core_map)
    return set(re.findall(rf"name='?({names})", str(jax.make_jaxpr(f)(x, x, x))))


def fused_taken(spec: PatternSpec, shape: tuple, block_q: int | None = None,
                block_k: int | None = None) -> bool:
    """Whether ``fuse_parts=True`` really runs the v2 kernels here (traced, not run)."""
    names = kernels_run(spec, shape, block_q, block_k, fuse_parts=True)
    return bool(names) and all(n.endswith("_v2") for n in names)


def column_taken(spec: PatternSpec, shape: tuple, block_q: int | None = None,
                 block_k: int | None = None, *, layer: int = 0) -> bool:
    """Whether the default path runs the column kernel here (``column_bwd``: columns of
    more tiles than COLUMN_BWD_MAX_TILES, or head dims above COLUMN_BWD_MAX_HEAD_DIM,
    keep the split kernels)."""
    names = kernels_run(spec, shape, block_q, block_k, layer=layer)
    return "sparse_attn_bwd_column_v2" in names


def mosaic_dkv_taken(spec: PatternSpec, shape: tuple, block_q: int | None = None,
                     block_k: int | None = None, *, layer: int = 0) -> bool:
    """Whether ``mosaic_summary_dkv=True`` really runs the Mosaic dK/dV kernel here (bf16
    at head dim 64 only)."""
    names = kernels_run(spec, shape, block_q, block_k, mosaic_summary_dkv=True,
                        mosaic_summary_dq=False, names=r"\w+", layer=layer)
    return "mgpu_attn_dkv_summary" in names


def mosaic_dq_taken(spec: PatternSpec, shape: tuple, block_q: int | None = None,
                    block_k: int | None = None, *, layer: int = 0) -> bool:
    """Whether ``mosaic_summary_dq=True`` really runs the Mosaic dK/dV kernel that also
    emits dq (where ``mosaic_summary_dkv`` applies)."""
    names = kernels_run(spec, shape, block_q, block_k, mosaic_summary_dq=True, names=r"\w+",
                        layer=layer)
    return "mgpu_attn_dkvdq_summary" in names


def has_summary(pattern) -> bool:
    """Whether a layer's pattern has summary columns (gathered keys)."""
    return any(c.kind == "summary" for head in pattern for c in head)


def mosaic_required(pattern, d: int, dt) -> bool:
    """Where the Mosaic summary kernels must run: bf16 at D=64, layers with summaries."""
    return d == 64 and dt == jnp.bfloat16 and has_summary(pattern)


# Variants whose option runs its own kernel only where it can: (the row's key, whether
# it ran here, whether it must run for a check case of that layer pattern, head dim d and
# dtype dt). A check case that should have taken it but did not fails: it checked the
# kernels it replaces.
OPTION_KERNELS = {
    MOSAIC_DKV_VARIANT[0]: ("mosaic_dkv_taken", mosaic_dkv_taken, mosaic_required),
    MOSAIC_DQ_VARIANT[0]: ("mosaic_dq_taken", mosaic_dq_taken, mosaic_required),
}


def log(*a) -> None:
    print(*a, flush=True)


# ----------------------------------------------------------------------- pair counts


def pairs_per_head(spec: PatternSpec, t: int) -> int:
    """Allowed (query, key) pairs of one merged/local head, counted per row in O(T)."""
    i = np.arange(t, dtype=np.int64)
    l = spec.stride  # noqa: E741
    if spec.name == "dense":
        return int((i + 1).sum())
    if spec.name == "local":
        return int((np.minimum(i, l) + 1).sum())
    if spec.name == "strided":  # local window + stride columns at distance >= 2l
        return int((np.minimum(i, l) + 1 + np.maximum(0, i // l - 1)).sum())
    if spec.name == "fixed":  # own block + c summary columns of each earlier block
        return int((i % l + 1 + (i // l) * spec.summary).sum())
    raise ValueError(spec.name)


def check_pair_counts() -> None:
    for spec in (PatternSpec("local", 16), PatternSpec("strided", 16),
                 PatternSpec("fixed", 16, 4), PatternSpec("dense")):
        want = allowed_pairs(spec.layer_pattern(0, 1), 256)
        assert pairs_per_head(spec, 256) == want, (spec, want)


# --------------------------------------------------------------------------- timing


def time_jax(fn, *args, budget_s: float = 1.5) -> float:
    """Median milliseconds per call of a jitted fn (warm-up excluded)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    iters = max(1, min(50, int(0.05 / max(one, 1e-6))))
    reps = max(3, min(9, int(budget_s / max(one * iters, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times) * 1e3


def time_torch(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------- GPU correctness


def value_and_grads(fn):
    def f(q, k, v, g):
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(g)

    return jax.jit(f)


def gpu_check(quick: bool, extra: tuple[str, ...] = ()) -> None:
    bf, f32 = jnp.bfloat16, jnp.float32
    cases = [
        (PatternSpec("strided", 64, combine="merged"), 64, bf),
        (PatternSpec("strided", 64, combine="merged"), 64, f32),
        (PatternSpec("fixed", 64, 16, combine="merged"), 64, bf),
        (PatternSpec("fixed", 64, 16, combine="merged"), 128, f32),
        (PatternSpec("fixed", 64, 16, combine="multihead", distinct_summaries=True), 128, bf),
        (PatternSpec("strided", 64, combine="multihead"), 128, bf),
        (PatternSpec("fixed", 64, 16, combine="interleaved"), 64, bf),
        (PatternSpec("local", 64), 64, bf),
        (PatternSpec("dense"), 128, bf),
    ]
    key = jax.random.PRNGKey(int(time.time()))
    # --quick: 3 cases per path, except the options, which get every case they apply to.
    options = FIXED_ONLY | {WIDE_CHAIN_VARIANT[0], SPLIT_BWD_VARIANT[0]}
    runs = [(c, var) for var in variants(extra)
            for c in (cases if var[0] in options or not quick else cases[:3])
            if applies(var[0], c[0].name, c[2])]
    for (spec, d, dt), (suffix, opts) in runs:
        # v2 at T=4096 so that l=64 columns (64 rows) hold whole 64-row blocks.
        b, t, h = 1, 1024 if suffix not in ("", *options) else 4096, 4
        if spec.name == "strided" and suffix in ("", SPLIT_BWD_VARIANT[0]):
            t = 8192  # l=64: 128-row columns, two 64-row tiles each (the benchmark's case)
        key, *ks = jax.random.split(key, 5)
        q, k, v, g = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(dt) for kk in ks)
        for layer in (0, 1) if spec.combine == "interleaved" else (0,):
            pat = spec.layer_pattern(layer, h)
            try:
                o, grads = value_and_grads(
                    lambda *a: kernel_fn(opts)(*a, pat))(q, k, v, g)
                f32s = [x.astype(jnp.float32) for x in (q, k, v, g)]
                # The reference at full float32 precision (XLA's GPU default is tf32).
                with jax.default_matmul_precision("highest"):
                    ro, rgrads = value_and_grads(lambda *a: reference_attention(*a, pat))(*f32s)
                errs = [rel_err(o, ro)] + [rel_err(a, r) for a, r in zip(grads, rgrads)]
                nan = any(bool(jnp.isnan(x).any()) for x in (o, *grads))
                tol = 1e-2 if dt == jnp.bfloat16 else 1e-4
                row = dict(pattern=spec.name, combine=spec.combine, layer=layer,
                           distinct=spec.distinct_summaries, d=d, dtype=jnp.dtype(dt).name,
                           variant=suffix or "default", t=t,
                           errs=errs, nan=nan, ok=(not nan) and max(errs) < tol)
                if not suffix and spec.name == "strided":
                    # Where the column kernel applies (D <= 64), a check of the split
                    # kernels is no check of the default path.
                    row["column_taken"] = column_taken(spec, (b, t, h, d), layer=layer)
                    if d <= pallas_gpu.COLUMN_BWD_MAX_HEAD_DIM:
                        row["ok"] = row["ok"] and row["column_taken"]
                if suffix in OPTION_KERNELS:
                    # (not `key`: that name holds the PRNG key of the next case)
                    taken_key, taken, required = OPTION_KERNELS[suffix]
                    row[taken_key] = taken(spec, (b, t, h, d), layer=layer)
                    if required(pat, d, dt):
                        row["ok"] = row["ok"] and row[taken_key]
            except Exception as e:  # keep going: the rest of the run still informs
                row = dict(pattern=spec.name, combine=spec.combine, d=d,
                           dtype=jnp.dtype(dt).name, variant=suffix or "default",
                           ok=False, error=repr(e)[:1500])
                traceback.print_exc()
            RESULTS["check"].append(row)
            log("check", row)


# -------------------------------------------------------------------------- peers


def cudnn_fns():
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    return fwd


def mha_fn():
    from jax.experimental.pallas.ops.gpu import attention as pallas_mha

    def fwd(q, k, v):
        return pallas_mha.mha(q, k, v, segment_ids=None, sm_scale=q.shape[-1] ** -0.5, causal=True)

    return fwd


def ours_fn(spec: PatternSpec, h: int, **opts):
    pat = spec.layer_pattern(0, h)

    def fwd(q, k, v):
        return kernel_fn(opts)(q, k, v, pat)

    return fwd


def fwd_bwd(fwd):
    def f(q, k, v, do):
        o, vjp = jax.vjp(fwd, q, k, v)
        return o, vjp(do)

    return f


def flex_setup():
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Every mask and shape is its own compile: lift dynamo's limit (default 8), past
    # which flex_attention silently falls back to an unfused, dense implementation.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096

    def block_mask(fn, t):
        # _compile=True builds the block mask without a dense [T, T] mask (4 GiB at 64k).
        return create_block_mask(fn, None, None, t, t, device="cuda", _compile=True)

    return torch, block_mask, torch.compile(flex_attention, dynamic=False)


def flex_masks(spec: PatternSpec):
    l, c = spec.stride, spec.summary  # noqa: E741
    if spec.name == "strided":
        return lambda b, h, q, kv: (q >= kv) & ((q - kv <= l) | ((q - kv) % l == 0))
    if spec.name == "fixed":
        return lambda b, h, q, kv: (q >= kv) & ((q // l == kv // l) | (kv % l >= l - c))
    if spec.name == "local":
        return lambda b, h, q, kv: (q >= kv) & (q - kv <= l)
    raise ValueError(spec.name)


# --------------------------------------------------------------------------- bench


def record(shape, name, pattern, fwd_ms, fb_ms, pairs, extra=None):
    d = shape[3]
    fl_f = 4 * d * pairs
    row = dict(shape=list(shape), impl=name, pattern=pattern, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
               pairs=pairs,
               fwd_tflops=None if fwd_ms is None else fl_f / fwd_ms / 1e9,
               fwd_bwd_tflops=None if fb_ms is None else 3.5 * fl_f / fb_ms / 1e9)
    if extra:
        row.update(extra)
    RESULTS["timings"].append(row)
    log("time", row)


def guarded(what, fn):
    try:
        return fn()
    except Exception as e:
        RESULTS["errors"].append(dict(what=what, error=repr(e)[:1500]))
        log("ERROR", what, repr(e)[:1500])
        traceback.print_exc()
        return None


def bench_shape(shape, quick: bool, sweep: bool, blocks: list[tuple[int, int]] | None = None,
                extra: tuple[str, ...] = ()) -> None:
    b, t, h, d = shape
    key = jax.random.PRNGKey(t + d)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16)
                   for kk in jax.random.split(key, 4))
    dense_pairs = b * h * t * (t + 1) // 2
    l = 128 if t <= 16384 else 256  # noqa: E741
    specs = {
        "strided": PatternSpec("strided", l, combine="merged"),
        "fixed": PatternSpec("fixed", 128, 32, combine="merged"),
        "local": PatternSpec("local", 128),
    }

    def timed(fn):
        f = jax.jit(fn)
        fb = jax.jit(fwd_bwd(fn))
        return time_jax(f, q, k, v), time_jax(fb, q, k, v, do)

    r = guarded(f"cudnn {shape}", lambda: timed(cudnn_fns()))
    if r:
        record(shape, "cudnn_dense_causal", "dense", *r, dense_pairs)
    if not quick:
        r = guarded(f"pallas_mha {shape}", lambda: timed(mha_fn()))
        if r:
            record(shape, "jax_pallas_mha_causal", "dense", *r, dense_pairs)

    ours_out = {}
    for name, spec in specs.items():
        pairs = b * h * pairs_per_head(spec, t)
        lay = build_layout(spec.layer_pattern(0, h), t, 64, 64)
        RESULTS["layout"].append(dict(shape=list(shape), pattern=name,
                                      visited_full_partial=lay.visited_blocks(),
                                      pair_fraction_of_dense=pairs / dense_pairs))
        configs = list(blocks or [(64, 64)])
        if sweep and name in ("strided", "fixed"):
            configs += [(128, 64), (128, 128), (32, 32)]
        # The kernel's own choice of tiles for this pattern, when it differs.
        auto = pallas_gpu.default_blocks(t, d, spec.layer_pattern(0, h))
        if auto not in configs:
            configs.append(auto)
        paths = variants(extra)
        for bq, bk in configs:
            for suffix, opts in paths:
                if not applies(suffix, name, jnp.bfloat16):
                    continue
                if opts.get("kernel") == "mosaic_gpu":
                    if (bq, bk) != configs[0]:
                        continue  # once per pattern, at the Mosaic kernel's own tiles
                    r = guarded(f"ours{suffix} {name} {shape}", lambda: timed(ours_fn(spec, h, **opts)))
                    if r:
                        record(shape, f"ours{suffix}", name, *r, pairs)
                    continue
                meta = None
                if not suffix:
                    meta = dict(fused_taken=guarded(
                        f"trace fused {name} {shape}",
                        lambda: fused_taken(spec, tuple(shape), bq, bk)))
                    if name == "strided":  # False: the row timed the split kernels
                        meta["column_taken"] = guarded(
                            f"trace column {name} {shape}",
                            lambda: column_taken(spec, tuple(shape), bq, bk))
                elif suffix in OPTION_KERNELS:  # False: the row timed the kernels it replaces
                    key, taken, _ = OPTION_KERNELS[suffix]
                    meta = {key: guarded(f"trace {key} {name} {shape}",
                                         lambda: taken(spec, tuple(shape), bq, bk))}
                r = guarded(f"ours{suffix} {name} {shape} {bq}x{bk}",
                            lambda: timed(ours_fn(spec, h, block_q=bq, block_k=bk, **opts)))
                if r:
                    record(shape, f"ours_{bq}x{bk}{suffix}", name, *r, pairs, meta)
        ours_out[name] = guarded(f"ours out {name}", lambda: jax.jit(ours_fn(spec, h))(q, k, v))

    if quick:  # --quick: cuDNN and ours only
        return
    # FlexAttention on identical inputs (converted through DLPack).
    try:
        torch, create_block_mask, flex = flex_setup()
    except Exception as e:
        RESULTS["errors"].append(dict(what="torch import", error=repr(e)))
        return
    tq, tk, tv, tdo = (torch.from_dlpack(x).permute(0, 2, 1, 3).contiguous() for x in (q, k, v, do))
    for name, spec in specs.items():
        pairs = b * h * pairs_per_head(spec, t)

        def run_flex():
            bm = create_block_mask(flex_masks(spec), t)
            x = [a.detach().clone().requires_grad_(True) for a in (tq, tk, tv)]
            fwd = lambda: flex(*x, block_mask=bm)  # noqa: E731
            out = fwd()
            err = None
            if ours_out.get(name) is not None:
                ref = out.detach().permute(0, 2, 1, 3).float().cpu().numpy()
                mine = np.asarray(ours_out[name].astype(jnp.float32))
                err = dict(max_abs_err_vs_flex=float(np.abs(mine - ref).max()),
                           rel_err_vs_flex=rel_err(mine, ref))
            f_ms = time_torch(fwd)

            def fb():
                o = fwd()
                o.backward(tdo)

            fb_ms = time_torch(fb)
            return f_ms, fb_ms, err

        r = guarded(f"flex {name} {shape}", run_flex)
        if r:
            record(shape, "flex_as_written", name, r[0], r[1], pairs, r[2])

    spec = specs["strided"]
    pairs = b * h * pairs_per_head(spec, t)

    def run_flex_perm():
        n = t // l
        bm_local = create_block_mask(flex_masks(PatternSpec("local", l)), t)
        # Permuted order p = col * n + row: same column <=> same segment of n rows.
        bm_stride = create_block_mask(
            lambda b_, h_, qi, kv: (qi // n == kv // n) & (qi - kv >= 2), t)
        x = [a.detach().clone().requires_grad_(True) for a in (tq, tk, tv)]

        def perm(a):
            return a.reshape(b, h, n, l, d).transpose(2, 3).reshape(b, h, t, d)

        def unperm(a):
            return a.reshape(b, h, l, n, d).transpose(2, 3).reshape(b, h, t, d)

        def fwd():
            oa, la = flex(*x, block_mask=bm_local, return_lse=True)
            ob, lb = flex(*(perm(a) for a in x), block_mask=bm_stride, return_lse=True)
            ob = unperm(ob)
            lb = lb.reshape(b, h, l, n).transpose(2, 3).reshape(b, h, t)
            m = torch.maximum(la, lb)
            wa, wb = torch.exp(la - m), torch.exp(lb - m)
            return ((wa[..., None] * oa + wb[..., None] * ob) / (wa + wb)[..., None]).to(oa.dtype)

        out = fwd()
        err = None
        if ours_out.get("strided") is not None:
            ref = out.detach().permute(0, 2, 1, 3).float().cpu().numpy()
            mine = np.asarray(ours_out["strided"].astype(jnp.float32))
            err = dict(max_abs_err_vs_flex=float(np.abs(mine - ref).max()),
                       rel_err_vs_flex=rel_err(mine, ref))
        f_ms = time_torch(fwd)

        def fb():
            fwd().backward(tdo)

        return f_ms, time_torch(fb), err

    r = guarded(f"flex permuted {shape}", run_flex_perm)
    if r:
        record(shape, "flex_permuted_lse_merged", "strided", r[0], r[1], pairs, r[2])


def table() -> str:
    rows = RESULTS["timings"]
    base = {tuple(r["shape"]): r for r in rows if r["impl"] == "cudnn_dense_causal"}
    lines = [f"{'shape':<20} {'impl':<26} {'pattern':<8} {'fwd ms':>8} {'f+b ms':>8} "
             f"{'f+b TF/s':>9} {'x cuDNN f+b':>11} {'TF/s % cuDNN':>12}"]
    for r in rows:
        c = base.get(tuple(r["shape"]))
        speed = pct = ""
        if c and r["fwd_bwd_ms"] and c["fwd_bwd_ms"]:
            speed = f"{c['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}"
            pct = f"{100 * r['fwd_bwd_tflops'] / c['fwd_bwd_tflops']:.0f}%"
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        tf = "-" if r["fwd_bwd_tflops"] is None else f"{r['fwd_bwd_tflops']:.0f}"
        lines.append(f"{str(tuple(r['shape'])):<20} {r['impl']:<26} {r['pattern']:<8} "
                     f"{fmt(r['fwd_ms']):>8} {fmt(r['fwd_bwd_ms']):>8} {tf:>9} {speed:>11} {pct:>12}")
    return "\n".join(lines)


def extra_variants(args: argparse.Namespace) -> tuple[str, ...]:
    """The EXTRA_VARIANTS the flags ask for (--variants is the v1 path)."""
    return tuple(name for name in EXTRA_VARIANTS
                 if getattr(args, "variants" if name == "v1" else name))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", help="path of the JSON results file")
    ap.add_argument("--quick", action="store_true",
                    help="first shape only (unless --shapes), 3 check cases, cuDNN and ours only")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-only", action="store_true",
                    help="the GPU check against the float32 reference only, no timings")
    ap.add_argument("--no-sweep", action="store_true")
    for flag, text in VARIANT_FLAGS.values():
        ap.add_argument(flag, action="store_true", help=text)
    ap.add_argument("--shapes", type=parse_shapes, default=None,
                    help="comma-separated BxTxHxD shapes to time (default: the issue's three; "
                         "--quick: the first)")
    ap.add_argument("--blocks", type=parse_blocks, default=None,
                    help="tile sizes to time ours at, e.g. 64x64,32x32 (default 64x64)")
    return ap.parse_args(argv)


def main() -> None:
    # `timeout` sends SIGTERM: still print the table and write what was measured.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    args = parse_args()
    check_pair_counts()
    RESULTS["device"] = str(jax.devices()[0].device_kind)
    RESULTS["jax"] = jax.__version__
    RESULTS["argv"] = sys.argv
    log("device", RESULTS["device"], "jax", jax.__version__)
    t0 = time.time()
    if args.check_only and args.skip_check:
        raise SystemExit("--check-only and --skip-check leave nothing to run: drop one.")
    shapes = [] if args.check_only else args.shapes or (SHAPES[:1] if args.quick else SHAPES)
    try:  # a timeout inside the check or the timings still writes what was measured
        if not args.skip_check:
            gpu_check(args.quick, extra_variants(args))
        log(f"check done in {time.time() - t0:.0f}s")
        for i, shape in enumerate(shapes):
            sweep = i == 0 and not args.no_sweep
            guarded(f"bench {shape}",
                    lambda: bench_shape(shape, args.quick, sweep, args.blocks, extra_variants(args)))
            log(f"shape {shape} done at {time.time() - t0:.0f}s")
            with open(args.out, "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
    except KeyboardInterrupt:
        RESULTS["errors"].append(dict(what="interrupted", error="stopped by SIGTERM/timeout"))
    with open(args.out, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    ok = sum(r.get("ok", False) for r in RESULTS["check"])
    print(f"\nGPU check: {ok}/{len(RESULTS['check'])} cases within tolerance "
          f"(bf16 < 1e-2, f32 < 1e-4); errors: {len(RESULTS['errors'])}")
    for r in RESULTS["check"]:
        if not r.get("ok"):
            print("  FAILED", {k: r.get(k) for k in ("pattern", "combine", "d", "dtype", "variant",
                                                      "errs", "error")})
    print(f"device: {RESULTS['device']}")
    print(table())


if __name__ == "__main__":
    main()
