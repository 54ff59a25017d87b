"""Benchmark: sparse-cache decoding against a dense-cache decoder of the same model.

The audio setting of the paper (context 65,536, strided attention with l = 256 =
sqrt(65,536), merged heads) with the depth cut to 8 layers of width 1,024 (16 heads)
so that the bf16 caches (about 17 GB at batch 8) fit one GPU comfortably. For each
length it generates ``length`` bytes for a batch of 8 from scratch with a cache of
that length and reports tokens per second, mean per-token (per-step) latency, the
latency of the last chunk (the most expensive steps for the dense decoder) and peak
device memory. The model is randomly initialised: the cost of a step does not depend
on the weights.

    python scripts/bench_sample.py --out bench_sample.json          # GPU
    python scripts/bench_sample.py --smoke --out /tmp/smoke.json    # tiny, CPU

Peak memory is JAX's running peak for the device, so runs go in increasing length
and each row's figure covers that run and the smaller ones before it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from sparse_lm.decode import Decoder, Sampling, gather_size  # noqa: E402
from sparse_lm.model import build_model, count_params  # noqa: E402


def bench_config(smoke: bool, num_layers: int | None = None) -> ml_collections.ConfigDict:
    """The benchmark's own model config (no checkpoint needed)."""
    seq_len, stride, layers, d_model, heads, dtype = (
        (256, 16, 2, 32, 4, "float32") if smoke else (65536, 256, 8, 1024, 16, "bfloat16")
    )
    cfg = ml_collections.ConfigDict()
    cfg.model = dict(
        vocab_size=256, num_layers=num_layers or layers, d_model=d_model, num_heads=heads,
        ff_ratio=4.0, qk_ratio=1.0, dropout=0.0, pos_shape=(seq_len // stride, stride),
        dtype=dtype, param_dtype="float32", remat="none",
    )
    cfg.attention = dict(
        pattern="strided", stride=stride, summary=32, combine="merged", distinct_summaries=False, impl="auto"
    )
    cfg.data = dict(seq_len=seq_len)
    return cfg


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on backends without stats (CPU)
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def time_decoder(
    model: Any, *, mode: str, batch: int, length: int, chunk: int, window: int, cache_dtype: Any
) -> dict[str, Any]:
    """Generate ``length`` positions (or the last ``window`` of them) and time it."""
    decoder = Decoder(
        model, batch_size=batch, length=length, sampling=Sampling(temperature=1.0),
        cache_dtype=cache_dtype, mode=mode,
    )
    # Compile (and warm up) on a throwaway state: every chunk reuses this executable.
    warm = decoder.run(decoder.init(), min(4, length))
    warm.tokens.block_until_ready()
    del warm

    start = max(0, length - window) if window else 0
    # Steps cost the same whatever the cache holds, so a window can start mid-sequence
    # on an empty cache instead of paying for the positions before it.
    state = decoder.init()._replace(t=jnp.int32(start))
    chunks: list[tuple[float, int]] = []  # (seconds, steps)
    done = start
    while done < length:
        stop = min(done + chunk, length)
        t0 = time.perf_counter()
        state = decoder.run(state, stop, seed=0)
        state.tokens.block_until_ready()
        chunks.append((time.perf_counter() - t0, stop - done))
        done = stop
    steps = length - start
    total = sum(secs for secs, _ in chunks)
    cache_bytes = sum(k.nbytes + v.nbytes for k, v in state.cache)
    del state
    return {
        "mode": mode,
        "length": length,
        "batch": batch,
        "steps_timed": steps,
        "tokens_per_s": batch * steps / total,
        "ms_per_token_mean": 1e3 * total / steps,
        "ms_per_token_last_chunk": 1e3 * chunks[-1][0] / chunks[-1][1],
        "keys_read_per_head": gather_size(next(model.layer_blocks()).pattern, length) if mode == "sparse" else length,
        "cache_bytes": cache_bytes,
        "peak_bytes": _peak_bytes(),
    }


def _table(rows: list[dict[str, Any]], speedups: dict[int, float]) -> str:
    head = f"{'mode':>6} {'length':>7} {'tok/s':>10} {'ms/tok':>8} {'ms/tok end':>10} {'keys/head':>9} {'peak GiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        lines.append(
            f"{r['mode']:>6} {r['length']:>7} {r['tokens_per_s']:>10.1f} {r['ms_per_token_mean']:>8.3f} "
            f"{r['ms_per_token_last_chunk']:>10.3f} {r['keys_read_per_head']:>9} {peak:>9}"
        )
    lines += [f"sparse / dense tokens/s at {n}: {s:.2f}x" for n, s in speedups.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny model and lengths, for CPU")
    parser.add_argument("--lengths", type=int, nargs="+", help="default 4096 16384 65536 (smoke: 64 128 256)")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (smoke: 2)")
    parser.add_argument("--num_layers", type=int, default=None, help="default 8 (smoke: 2)")
    parser.add_argument("--chunk", type=int, default=None, help="steps per jitted chunk (default 1024; smoke 32)")
    parser.add_argument("--window", type=int, default=0, help="time only the last N steps of each length (0: all)")
    parser.add_argument("--modes", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    args = parser.parse_args(argv)

    cfg = bench_config(args.smoke, args.num_layers)
    lengths = sorted(args.lengths or ([64, 128, 256] if args.smoke else [4096, 16384, 65536]))
    batch = args.batch or (2 if args.smoke else 8)
    chunk = args.chunk or (32 if args.smoke else 1024)
    cache_dtype = jnp.float32 if args.smoke else jnp.bfloat16
    model = build_model(cfg, nnx.Rngs(0))
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}); params: {count_params(model):,}; "
          f"layers {cfg.model.num_layers}, d_model {cfg.model.d_model}, heads {cfg.model.num_heads}, "
          f"strided l={cfg.attention.stride} merged, batch {batch}", flush=True)

    rows = []
    for length in lengths:
        for mode in args.modes:
            row = time_decoder(
                model, mode=mode, batch=batch, length=length, chunk=chunk, window=args.window,
                cache_dtype=cache_dtype,
            )
            print(f"  {mode} length {length}: {row['tokens_per_s']:.1f} tok/s", flush=True)
            rows.append(row)
    speedups = {
        n: by["sparse"]["tokens_per_s"] / by["dense"]["tokens_per_s"]
        for n in lengths
        for by in [{r["mode"]: r for r in rows if r["length"] == n}]
        if {"sparse", "dense"} <= by.keys()
    }
    result = {
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "config": cfg.to_dict(),
        "num_params": count_params(model),
        "batch": batch,
        "chunk": chunk,
        "window": args.window,
        "cache_dtype": jnp.dtype(cache_dtype).name,
        "results": rows,
        "speedup_tokens_per_s": {str(n): s for n, s in speedups.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(_table(rows, speedups))
    return result


if __name__ == "__main__":
    main()
