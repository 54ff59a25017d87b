"""Sweep the Triton kernel's launch parameters and read each kernel's time from a profile (GPU).

    python3 scripts/tune_attention.py OUT.json [--shapes 2x16384x8x64] [--patterns strided,fixed]
        [--blocks 64x64,128x64] [--warps 4,8] [--stages 2,3] [--deadline_s 400]

For every (shape, pattern, block_q x block_k, num_warps, num_stages) the forward+backward
of ``pallas_gpu.attention`` is timed (median, pipelined calls, as bench_attention.py)
and profiled: the device time of each kernel name is read from the trace
(sparse_lm.profiling). The launches of a part share their name (sparse_attn_fwd_v2,
..._bwd_dq_v2, ..._bwd_dkv_v2); the compiler makes the names of a second part's
kernels unique with a suffix (``__1``), so parts usually show apart, but check the JSON
before reading a row as one kernel. With ``colaunch`` (the default) the fixed pattern's
two parts share one forward and one dQ kernel, so only its dK/dV shows per part.
Kernels of one setting share nothing but the chained partial state, so each kernel's
best setting can be read off independently. Patterns:
strided and local (l=128, or 256 from T=65,536) and fixed (l=128, c=32), all merged.
Prints a table last, then the fastest setting per pattern and shape as the config
overrides that select it in training (``--config.attention.block_q=...``); the JSON has
every kernel and those (``best``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_attention import fwd_bwd, parse_blocks, parse_shapes, time_jax  # noqa: E402
from sparse_lm import profiling  # noqa: E402
from sparse_lm.attention import PatternSpec, pallas_gpu  # noqa: E402
from sparse_lm.model import GPU_KERNEL_TUNING  # noqa: E402 - the config fields a row's setting maps to


def pattern_spec(name: str, t: int) -> PatternSpec:
    l = 256 if t >= 65536 else 128  # noqa: E741 - the paper's stride symbol
    if name == "strided":
        return PatternSpec("strided", l, combine="merged")
    if name == "fixed":
        return PatternSpec("fixed", 128, 32, combine="merged")
    if name == "local":
        return PatternSpec("local", l)
    raise argparse.ArgumentTypeError(f"unknown pattern {name!r}: use strided, fixed or local")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def best_settings(rows: list[dict]) -> list[dict]:
    """The fastest setting (f+b) of each (pattern, shape) among rows without error, with
    the config overrides that select it in training (``attention.block_q`` etc.)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if "error" in r or "fwd_bwd_ms" not in r:
            continue
        key = (r["pattern"], tuple(r["shape"]))
        if key not in best or r["fwd_bwd_ms"] < best[key]["fwd_bwd_ms"]:
            best[key] = r
    out = []
    for (pattern, shape), r in best.items():
        overrides = " ".join(f"--config.attention.{n}={r[n]}" for n in GPU_KERNEL_TUNING if n in r)
        out.append(dict(pattern=pattern, shape=list(shape), fwd_bwd_ms=r["fwd_bwd_ms"],
                        overrides=overrides))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shapes", type=parse_shapes, default=[(2, 16384, 8, 64)])
    ap.add_argument("--patterns", default="strided,fixed")
    ap.add_argument("--blocks", type=parse_blocks, default=[(64, 64), (128, 64)])
    ap.add_argument("--warps", type=ints, default=[4, 8])
    ap.add_argument("--stages", type=ints, default=[2, 3])
    ap.add_argument("--profile_steps", type=int, default=3)
    ap.add_argument("--deadline_s", type=float, default=0.0, help="stop starting new settings after this")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("tune_attention.py times the Triton kernel on a GPU; this backend is "
                 f"{jax.default_backend()!r}.")
    t_start, rows = time.time(), []
    for shape in args.shapes:
        b, t, h, d = shape
        key = jax.random.PRNGKey(0)
        q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16)
                       for kk in jax.random.split(key, 4))
        for name in args.patterns.split(","):
            pat = pattern_spec(name, t).layer_pattern(0, h)
            for (bq, bk), warps, stages in itertools.product(args.blocks, args.warps, args.stages):
                if args.deadline_s and time.time() - t_start > args.deadline_s:
                    break
                row = dict(shape=list(shape), pattern=name, block_q=bq, block_k=bk,
                           num_warps=warps, num_stages=stages)
                try:
                    def fwd(q, k, v, bq=bq, bk=bk, warps=warps, stages=stages):
                        return pallas_gpu.attention(q, k, v, pat, block_q=bq, block_k=bk,
                                                    num_warps=warps, num_stages=stages)

                    f = jax.jit(fwd_bwd(fwd))
                    row["fwd_bwd_ms"] = time_jax(f, q, k, v, do)
                    folder = f"/tmp/tune_prof/{name}_{t}_{d}_{bq}x{bk}_w{warps}_s{stages}"
                    profiling.profile(lambda: f(q, k, v, do), folder, args.profile_steps)
                    br = profiling.kernel_breakdown(folder, steps=args.profile_steps, top=40)
                    row["device_ms"] = br["device_ms"]
                    row["kernels"] = {n: ms for n, ms, _ in br["top"] if n.startswith("sparse_attn")}
                except Exception as e:  # noqa: BLE001 - a setting may not compile; keep sweeping
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                rows.append(row)
                print("row", json.dumps(row), flush=True)
                with open(args.out, "w") as fh:  # after every row: a cut-short sweep keeps its rows
                    json.dump({"device_kind": jax.devices()[0].device_kind, "command": " ".join(sys.argv),
                               "rows": rows, "best": best_settings(rows)}, fh, indent=1)
    print(f"\ncard: {jax.devices()[0].device_kind}")
    for r in rows:
        head = f"{r['pattern']:<8}{'x'.join(map(str, r['shape'])):<16}{r['block_q']}x{r['block_k']:<5}w{r['num_warps']} s{r['num_stages']}"
        if "error" in r:
            print(f"{head}  error {r['error'][:100]}")
            continue
        ks = "  ".join(f"{n.replace('sparse_attn_', '')}={ms * 1e3:.0f}" for n, ms in sorted(r["kernels"].items()))
        print(f"{head}  f+b {r['fwd_bwd_ms']:.3f} ms  [{ks}] us")
    print("\nfastest per pattern and shape (config overrides for training on this card):")
    for r in best_settings(rows):
        print(f"{r['pattern']:<8}{'x'.join(map(str, r['shape'])):<16}f+b {r['fwd_bwd_ms']:.3f} ms  {r['overrides']}")


if __name__ == "__main__":
    main()
