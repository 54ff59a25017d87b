"""Time the dropout keep-mask against jax.random.bernoulli (any backend).

    python3 scripts/bench_dropout.py [--shape 2,12288,512] [--rate 0.4]

The model draws its masks with ``sparse_lm.model.dropout_keep_mask`` (8 random bits
per element, four elements per 32-bit threefry draw) instead of
``jax.random.bernoulli`` (one 32-bit draw per element); this prints both, median of 7
calls after a warm-up, on the default backend.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from sparse_lm.model import dropout_keep_mask  # noqa: E402


def median_ms(f, key, reps: int = 7) -> float:
    f(key).block_until_ready()
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        f(jax.random.fold_in(key, i)).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="2,12288,512")
    ap.add_argument("--rate", type=float, default=0.4)
    args = ap.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    key = jax.random.key(0)
    old = jax.jit(lambda k: jax.random.bernoulli(k, 1.0 - args.rate, shape))
    new = jax.jit(lambda k: dropout_keep_mask(k, args.rate, shape)[0])
    out = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "shape": shape,
           "bernoulli_ms": median_ms(old, key), "keep_mask_ms": median_ms(new, key)}
    print(f"{out['device']} ({out['backend']}), mask of {shape}, rate {args.rate}:")
    print(f"  jax.random.bernoulli       {out['bernoulli_ms']:8.2f} ms")
    print(f"  dropout_keep_mask (8-bit)  {out['keep_mask_ms']:8.2f} ms"
          f"  ({out['bernoulli_ms'] / out['keep_mask_ms']:.1f}x faster)")
    return out


if __name__ == "__main__":
    main()
