"""Benchmark one training step of a config: compiled memory, step time, tokens/s and MFU.

    python scripts/bench_train.py --config configs/enwik8.py --out bench_enwik8.json \
        [--config.data.batch_size=8 ...] [--impls auto,cudnn_dense] [--steps 20] \
        [--find_max_batch] [--peak_tflops 989]
    python scripts/bench_train.py --smoke --out /tmp/bench_smoke.json      # CPU check

For each attention impl (default: the config's sparse kernel and cuDNN dense attention,
the same model otherwise), in one process: the train step is compiled ahead of time
from abstract inputs, the compiler's memory analysis is printed, then the compiled
executable runs ``--warmup`` untimed and ``--steps`` timed steps on random tokens (the
step alone: no input pipeline) and the median step time is reported, each step waited
for. Then as many steps run dispatched back to back, as train.py runs between its log
steps, and their mean is reported too ("pipelined"): the host's dispatch of the next
step overlaps the device's work, as in training.

FLOP convention (printed with the results): model FLOPs only, rematerialisation not
counted. Matmuls: 2 FLOPs per multiply-add of every projection, feed-forward and output
layer; forward+backward = 3x forward. Attention: (2*qk_dim + 2*v_dim) FLOPs (= 4*D)
per (query, key) pair the layer's pattern allows (``attention.allowed_pairs``; a dense
causal layer: T(T+1)/2 per head); forward+backward = 3.5x forward (the backward pass
recomputes the scores). MFU = those FLOPs per second over the devices' dense bf16 peak.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sparse_lm import config as config_lib  # noqa: E402
from sparse_lm import distributed, profiling, sharding  # noqa: E402
from sparse_lm.attention import allowed_pairs, resolve_impl  # noqa: E402
from sparse_lm.train import TrainProgram  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/enwik8.py or configs/enwik8.py:small.")
flags.DEFINE_string("out", None, "Where to write the JSON results.")
flags.DEFINE_list("impls", ["auto", "cudnn_dense"],
                  "Attention impls to compare, same model otherwise; an impl may set boolean attention "
                  "options after a '+' (auto+mosaic_forward, auto+colaunch=false).")
flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
flags.DEFINE_float("peak_tflops", 0.0, "Dense bf16 peak per device; 0: from the device kind.")
flags.DEFINE_bool("find_max_batch", False, "Also binary-search the largest global batch that fits.")
flags.DEFINE_integer("max_batch", 4096, "Upper bound of the --find_max_batch search (rows).")
flags.DEFINE_float("device_memory_gb", 0.0, "Memory per device for --find_max_batch; 0: the allocator's limit.")
flags.DEFINE_string("profile", None, "Folder: after timing, trace --profile_steps steps with the JAX profiler "
                    "and print device kernel time per category and kernel name, with the top kernels' source lines "
                    "(one subfolder per impl).")
flags.DEFINE_integer("profile_steps", 2, "Steps traced with --profile.")
flags.DEFINE_integer("profile_top", 20, "Kernel names listed (by device time) in --profile's breakdown.")
flags.DEFINE_bool("smoke", False, "Quick check: configs/enwik8.py:smoke (unless --config), 2 warm-up and 3 timed steps (bfloat16 on GPU).")
flags.mark_flag_as_required("out")
FLAGS = flags.FLAGS

FLOP_CONVENTION = (
    "model FLOPs (remat recomputation not counted); matmul fwd+bwd = 3x fwd; attention 4*D "
    "FLOPs per allowed (query, key) pair fwd ((2*qk_dim + 2*v_dim) in general), fwd+bwd = 3.5x; "
    "MFU over dense bf16 peak x devices"
)
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s per device, matched on device_kind.
# The first matching key wins, so the PCIe/NVL variants come before the plain names.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("A100", 312.0),
)


def log(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def peak_tflops(device) -> float | None:
    if FLAGS.peak_tflops > 0:
        return FLAGS.peak_tflops
    return next((v for k, v in PEAK_TFLOPS if k in device.device_kind), None)


def model_flops(config: ml_collections.ConfigDict, impl: str) -> dict:
    """Forward and forward+backward FLOPs of one global batch under FLOP_CONVENTION."""
    m, spec = config.model, config_lib.pattern_spec(config)
    t, d, h, v = config.data.seq_len, m.d_model, m.num_heads, m.vocab_size
    head_dim = d // h
    qk, dv, dff = round(head_dim * m.qk_ratio), head_dim, round(d * m.ff_ratio)
    per_token_layer = 2 * d * h * (2 * qk + dv) + 2 * h * dv * d + 2 * 2 * d * dff
    matmul_fwd = t * (m.num_layers * per_token_layer + 2 * d * v)
    if impl == "cudnn_dense":  # attends to every earlier key whatever the pattern says
        pairs = m.num_layers * h * t * (t + 1) // 2
    else:
        cache: dict = {}
        pairs = 0
        for layer in range(m.num_layers):
            for head in spec.layer_pattern(layer, h):
                if head not in cache:  # heads repeat across layers; counting is O(T^2)
                    cache[head] = allowed_pairs((head,), t)
                pairs += cache[head]
    attn_fwd = pairs * (2 * qk + 2 * dv)
    b = config.data.batch_size
    return {
        "matmul_fwd": b * matmul_fwd,
        "attention_fwd": b * attn_fwd,
        "attention_pairs_per_sequence": pairs,
        "train_step": b * (3 * matmul_fwd + 3.5 * attn_fwd),
    }


class Bench(TrainProgram):
    """One config and impl: the training program plus batches and AOT compilation."""

    def __init__(self, config: ml_collections.ConfigDict, devices: list | None = None):
        """On ``devices`` (default: all) arranged by ``config.mesh``."""
        config_lib.validate(config)
        super().__init__(config, sharding.make_mesh(config.mesh, devices))

    def batch_shape(self, batch_size: int) -> tuple[int, int, int]:
        accum = self.config.optim.grad_accum_steps
        return (accum, batch_size // accum, self.config.data.seq_len)

    def compile(self, batch_size: int):
        """Lowers and compiles for ``batch_size`` rows from shapes alone (nothing allocated)."""
        state = self.abstract_state_on_mesh()
        batch = jax.ShapeDtypeStruct(self.batch_shape(batch_size), jnp.int32, sharding=self.batch_sh)
        # Traced under the mesh, as the training loop traces its step: Pallas kernels, which
        # XLA cannot partition, then run per shard (attention.adapt) instead of gathered.
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(state, batch).compile()

    def random_batch(self, batch_size: int) -> jax.Array:
        shape = self.batch_shape(batch_size)
        # Each process makes only its rows, as the training loop's data shards would.
        local = (shape[0], shape[1] // jax.process_count(), shape[2])
        rng = np.random.default_rng(jax.process_index())
        tokens = rng.integers(0, self.config.model.vocab_size, local, dtype=np.int32)
        return sharding.global_batch(tokens, self.mesh, extra_leading=1)


def memory_report(compiled) -> dict:
    m = compiled.memory_analysis()
    fields = (
        "peak_memory_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
        "alias_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes",
    )
    if m is None:
        return {}
    out = {f: int(getattr(m, f, 0) or 0) for f in fields}
    # What must be live at once is at most arguments + outputs + scratch, less the donated
    # buffers reused as outputs. The CPU runtime's own peak leaves the scratch out (seen
    # with jax 0.11), so fitting is judged on the larger of the two, safe on any backend.
    bound = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
             + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
    out["estimated_peak_bytes"] = max(out["peak_memory_in_bytes"], bound)
    return out


def time_steps(bench: Bench, compiled, batch_size: int, profile_dir: str | None = None
               ) -> tuple[list[float], float, dict | None]:
    """Seconds of each timed step; every step waits for the whole new state, so a step's
    time includes its optimizer update and nothing of the next step. Then the mean
    seconds per step of as many steps dispatched back to back (one wait at the end), the
    training loop's steady state. With ``profile_dir``,
    then traces ``--profile_steps`` more steps and returns their kernel breakdown."""
    state = bench.init_on_mesh()
    batch = bench.random_batch(batch_size)
    for _ in range(max(1, FLAGS.warmup)):  # at least one: the first call pays one-off costs
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(FLAGS.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    # As train.py runs between its log steps: the next step is dispatched while this one
    # runs, so the host's dispatch (and the sync above) leave no gap on the device.
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    pipelined = (time.perf_counter() - t0) / FLAGS.steps
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
        raise FloatingPointError(f"the benchmarked step produced a non-finite loss {loss}")
    breakdown = None
    if profile_dir:
        held = {"state": state}

        def step():
            held["state"], m = compiled(held["state"], batch)  # the state is donated
            return held["state"], m

        profiling.profile(step, profile_dir, FLAGS.profile_steps)
        state = held["state"]
        try:
            breakdown = profiling.kernel_breakdown(profile_dir, steps=FLAGS.profile_steps,
                                                   top=FLAGS.profile_top)
        except ValueError as e:  # CPU: the trace is there (host events) but has no kernels
            breakdown = {"error": str(e), "trace_dir": profile_dir}
    del state
    return times, pipelined, breakdown


def device_memory_limit() -> int | None:
    if FLAGS.device_memory_gb > 0:
        return int(FLAGS.device_memory_gb * 2**30)
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def fits(bench: Bench, batch_size: int, limit: int) -> tuple[bool, int | None]:
    try:
        peak = memory_report(bench.compile(batch_size)).get("estimated_peak_bytes")
    except Exception as e:  # noqa: BLE001 - the compiler refusing a size means it does not fit
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            return False, None
        raise
    return peak is not None and peak <= limit, peak


def find_max_batch(bench: Bench, known_fit: int = 0) -> dict:
    """Largest global batch whose compiled peak fits the device memory (compile only).

    ``known_fit``: a batch already compiled and run (the timed one), where the
    doubling search starts instead of at one unit: each probe is a full compile.
    """
    limit = device_memory_limit()
    if limit is None:
        return {"error": "device memory unknown: pass --device_memory_gb"}
    # Batches the mesh and accumulation can split: multiples of this unit.
    unit = sharding.data_parallel_size(bench.mesh) * bench.config.optim.grad_accum_steps
    unit *= jax.process_count() // math.gcd(unit, jax.process_count())
    tried = {}

    def ok(k: int) -> bool:
        good, peak = fits(bench, k * unit, limit)
        tried[k * unit] = peak
        log(f"  batch {k * unit}: peak {gib(peak)} -> {'fits' if good else 'too big'}")
        return good

    log(f"  memory limit per device: {gib(limit)}")
    top = max(1, FLAGS.max_batch // unit)  # the largest multiple of the unit allowed
    start = max(1, min(known_fit // unit, top))
    if ok(start):
        lo, hi = start, 2 * start
        while hi <= top and ok(hi):
            lo, hi = hi, hi * 2
        hi = min(hi, top + 1)
    elif start > 1 and ok(1):  # the timed batch's estimate is over the limit: search below it
        lo, hi = 1, start
    else:
        return {"max_batch": 0, "limit_bytes": limit, "tried": tried}
    while hi - lo > 1:  # invariant: lo fits, hi does not (or is past the bound)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return {"max_batch": lo * unit, "limit_bytes": limit, "peak_bytes": tried[lo * unit], "tried": tried}


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def run_impl(base: ml_collections.ConfigDict, spec: str) -> dict:
    """Compile, time (and optionally profile and search the batch of) one --impls entry."""
    impl, options = config_lib.parse_impl_variant(spec, base.attention)
    config = copy.deepcopy(base)
    config.attention.impl = impl
    config.attention.update(options)
    resolved = resolve_impl(impl)
    label = "+".join([resolved, *(n if v else f"{n}=false" for n, v in options.items())])
    bench = Bench(config)
    b = config.data.batch_size
    t0 = time.perf_counter()
    compiled = bench.compile(b)
    compile_s = time.perf_counter() - t0
    mem = memory_report(compiled)
    log(f"[{label}] compiled in {compile_s:.1f} s; memory analysis (per device): "
        + ", ".join(f"{k.replace('_in_bytes', '').replace('_bytes', '')}={gib(v)}" for k, v in mem.items()))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    profile_dir = os.path.join(FLAGS.profile, spec) if FLAGS.profile else None
    times, pipelined, breakdown = time_steps(bench, compiled, b, profile_dir)
    step_s = statistics.median(times)
    flops = model_flops(config, impl if impl == "cudnn_dense" else resolved)
    tokens = b * config.data.seq_len
    peak = peak_tflops(jax.devices()[0])
    result = {
        "impl": spec,
        "resolved_impl": resolved,
        "label": label,
        "attention_options": options,
        "num_params": bench.num_params,
        "batch_size": b,
        "seq_len": config.data.seq_len,
        "compile_s": compile_s,
        "memory": mem,
        # XLA's own count, for comparison: it misses custom calls (Pallas, cuDNN).
        "xla_cost_flops": float(cost.get("flops", 0.0)) if cost else None,
        "step_times_s": times,
        "step_s": step_s,
        "pipelined_step_s": pipelined,
        "steps_per_s": 1.0 / step_s,
        "tokens_per_s": tokens / step_s,
        "flops": flops,
        "model_tflops_per_s": flops["train_step"] / step_s / 1e12,
        "peak_tflops_per_device": peak,
        "mfu": flops["train_step"] / step_s / (peak * 1e12 * jax.device_count()) if peak else None,
    }
    log(f"[{label}] median step {step_s * 1e3:.1f} ms, {result['tokens_per_s']:,.0f} tokens/s, "
        f"{result['model_tflops_per_s']:.1f} model TFLOP/s; {pipelined * 1e3:.1f} ms per step dispatched back to back")
    if breakdown is not None:
        if "error" not in breakdown:
            try:  # the source lines are a help: a backend without HLO text loses only them
                breakdown = profiling.with_sources(breakdown, compiled.as_text())
            except Exception as e:  # noqa: BLE001
                breakdown = {**breakdown, "sources": {}, "sources_error": repr(e)}
        result["profile"] = breakdown
        log(f"[{label}] profile: {breakdown['error']}" if "error" in breakdown
            else profiling.format_breakdown(f"[{label}] profile ({profile_dir})", breakdown,
                                            step_s * 1e3, sources=breakdown["sources"]))
    if FLAGS.find_max_batch:
        log(f"[{label}] searching the largest batch that fits:")
        result["max_batch"] = find_max_batch(bench, known_fit=b)
    del compiled, bench
    jax.clear_caches()  # the next impl's compile should not keep this one's executables
    return result


def table(results: list[dict]) -> str:
    w = max([14] + [len(r.get("label", r["impl"])) + 1 for r in results])
    head = (f"{'impl':<{w}}{'batch':>6}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}{'peak mem':>11}"
            f"{'vs dense':>9}{'pipelined':>11}{'vs dense':>9}")
    dense = next((r for r in results if r.get("resolved_impl") == "cudnn_dense" and "error" not in r), None)
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append(f"{r['impl']:<{w}}  failed: {r['error'][:80]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        speed = f"{r['steps_per_s'] / dense['steps_per_s']:.2f}x" if dense else "-"
        piped = f"{dense['pipelined_step_s'] / r['pipelined_step_s']:.2f}x" if dense else "-"
        rows.append(
            f"{r['label']:<{w}}{r['batch_size']:>6}{r['step_s'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}"
            f"{r['model_tflops_per_s']:>9.3g}{mfu:>7}{gib(r['memory'].get('estimated_peak_bytes')):>11}{speed:>9}"
            f"{r['pipelined_step_s'] * 1e3:>11.1f}{piped:>9}"
        )
        if "max_batch" in r:
            rows.append(f"{'':<{w}}largest batch that fits: {r['max_batch'].get('max_batch', r['max_batch'])}")
    rows.append(f"FLOPs: {FLOP_CONVENTION}")
    return "\n".join(rows)


def config_from_flags() -> ml_collections.ConfigDict:
    """--config, or with --smoke and none given the enwik8 smoke config; --smoke also
    trims --steps and --warmup."""
    config = FLAGS.config
    if config is None:
        if not FLAGS.smoke:
            raise app.UsageError("--config is required (or --smoke for the CPU check).")
        from configs.enwik8 import get_config

        config = get_config("smoke")
    if FLAGS.smoke:
        FLAGS.steps, FLAGS.warmup = min(FLAGS.steps, 3), min(FLAGS.warmup, 2)
    return config


def main(argv) -> None:
    del argv
    config = config_from_flags()
    if FLAGS.smoke:
        if jax.default_backend() == "gpu" and "cudnn_dense" in FLAGS.impls:
            # The smoke model computes in float32, which cuDNN attention does not take.
            config.model.dtype = "bfloat16"
            log("--smoke on GPU: model.dtype set to bfloat16 for cuDNN attention.")
    device = jax.devices()[0]
    log(f"{distributed.process_summary()}; device kind {device.device_kind!r}")
    log(f"FLOP convention: {FLOP_CONVENTION}")
    for spec in FLAGS.impls:  # every entry checked before the first compile
        try:
            config_lib.parse_impl_variant(spec, config.attention)
        except config_lib.ConfigError as e:
            raise app.UsageError(f"--impls {e}") from None
    results = []
    for impl in FLAGS.impls:
        try:
            results.append(run_impl(config, impl))
        except Exception as e:  # noqa: BLE001 - one impl failing must not lose the others' figures
            traceback.print_exc()
            results.append({"impl": impl, "error": f"{type(e).__name__}: {e}"})
    report = {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "command": " ".join(sys.argv),
        "config": json.loads(config.to_json_best_effort()),
        "flop_convention": FLOP_CONVENTION,
        "results": results,
    }
    if jax.process_index() == 0:
        Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.out).write_text(json.dumps(report, indent=2) + "\n")
    log(f"JSON: {os.path.abspath(FLAGS.out)}")
    log("\n" + table(results))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
