"""Time LayerNorm forward+backward with XLA's backward and with the Pallas kernel (any backend).

    python3 scripts/bench_layer_norm.py [--shape 8,12288,512] [--dtype bfloat16] [--out ln.json]

The model's block norms go through ``sparse_lm.layer_norm.layer_norm_residual``; its
backward is either XLA's fusions (``model.layer_norm_impl=xla``) or one Pallas kernel
(``pallas_gpu``). This times the gradient of (norm(x), x) for both (median of 20 samples
of 10 calls dispatched back to back, after a warm-up) on the default backend (on CPU
the kernel runs in the Pallas interpreter, so only a GPU gives meaningful figures),
checks that they agree, and counts the bytes each must move at least (read x, dy and
the residual cotangent, write dx) against the time. ``--sweep`` also times the kernel
over its tuning constants.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparse_lm import layer_norm as ln  # noqa: E402
from sparse_lm.layer_norm import layer_norm_residual  # noqa: E402


def median_ms(f, args, reps: int, calls: int = 10) -> float:
    """Median over ``reps`` samples of the mean time of ``calls`` calls dispatched back to
    back: one wait per sample, so the host's dispatch and the wait are not counted per
    call, as in a training step. (Waiting on every call, session 14's first version
    gave the kernel 0.36 ms at [8, 12288, 512] bf16 on an H200, where the step's
    profile shows 0.14 ms per call.)"""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8,12288,512")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON results here")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the Pallas backward over its block sizes, warps and stages "
                         "(sparse_lm.layer_norm's ROW_CHUNK_ELEMENTS, ROWS_PER_PROGRAM, NUM_WARPS, NUM_STAGES)")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = jnp.dtype(args.dtype)
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], shape).astype(dtype)
    scale = 1.0 + 0.1 * jax.random.normal(k[1], shape[-1:])
    bias = jnp.zeros(shape[-1:])
    dy = jax.random.normal(k[2], shape).astype(dtype)
    dres = jax.random.normal(k[3], shape).astype(dtype)

    def grads(impl):
        def f(x, scale, bias, dy, dres):
            _, vjp = jax.vjp(lambda x, s, b: layer_norm_residual(x, s, b, dtype, impl), x, scale, bias)
            return vjp((dy, dres))
        return jax.jit(f)

    inputs = (x, scale, bias, dy, dres)
    results = {impl: grads(impl)(*inputs) for impl in ("xla", "pallas_gpu")}
    diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) / (float(jnp.max(jnp.abs(b))) or 1.0))
               for a, b in zip(results["pallas_gpu"], results["xla"]))
    min_bytes = 4 * int(np.prod(shape)) * dtype.itemsize  # x, dy, residual cotangent in; dx out
    out = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "shape": shape,
           "dtype": dtype.name, "max_rel_diff": diff, "min_bytes": min_bytes}
    print(f"{out['device']} ({out['backend']}), LayerNorm backward (x and its residual use) of {shape} {dtype.name}:")
    for impl in ("xla", "pallas_gpu"):
        ms = median_ms(grads(impl), inputs, args.reps)
        out[f"{impl}_ms"] = ms
        print(f"  {impl:10s} {ms:8.3f} ms   {min_bytes / ms / 1e9:6.2f} TB/s of the minimum bytes")
    print(f"  largest difference of the gradients, relative to their largest value: {diff:.2e}")
    if args.sweep:
        out["sweep"] = sweep(grads, inputs, args.reps, min_bytes)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


def sweep(grads, inputs, reps: int, min_bytes: int) -> list[dict]:
    """Time the Pallas backward at each setting of its tuning constants (set on the module
    for the trace; each grads() call traces afresh), restoring them afterwards."""
    names = ("ROW_CHUNK_ELEMENTS", "ROWS_PER_PROGRAM", "NUM_WARPS", "NUM_STAGES")
    grid = itertools.product((2048, 4096, 8192), (32, 64, 128, 256), (4, 8), (1, 2))
    saved = {n: getattr(ln, n) for n in names}
    rows = []
    try:
        for values in grid:
            setting = dict(zip(names, values))
            for n, v in setting.items():
                setattr(ln, n, v)
            label = " ".join(f"{n}={v}" for n, v in setting.items())
            try:
                ms = median_ms(grads("pallas_gpu"), inputs, reps)
            except Exception as e:  # a setting Triton cannot compile: report, go on
                print(f"  {label}: {type(e).__name__}")
                continue
            rows.append({**setting, "ms": ms})
            print(f"  {label}  {ms:7.3f} ms  {min_bytes / ms / 1e9:5.2f} TB/s")
    finally:
        for n, v in saved.items():
            setattr(ln, n, v)
    if rows:
        print(f"  fastest: {min(rows, key=lambda r: r['ms'])}")
    return rows

if __name__ == "__main__":
    main()
