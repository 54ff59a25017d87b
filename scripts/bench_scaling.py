"""Scaling on the devices of one machine: data-parallel and FSDP meshes against one device.

    python scripts/bench_scaling.py --config configs/enwik8.py:small \
        --config.data.path=.gpu_data/enwik8_first_1MB.xml --out scaling.json \
        [--per_device_batch 8] [--steps 20] [--warmup 3] [--loss_steps 5] [--stop_after_s 170]
    python scripts/bench_scaling.py --smoke --per_device_batch 2 --out /tmp/s.json  # CPU check
                                    (with XLA_FLAGS=--xla_force_host_platform_device_count=2)

One process sees N devices. Meshes: ``1 device`` (the first device alone), ``data``
(data=N: parameters replicated) and ``fsdp`` (fsdp=N: parameters and optimizer state
sharded), each given the same rows per device, so the N-device meshes train on N times
the global batch.

1. Throughput: per mesh, the train step is compiled ahead of time (as
   ``scripts/bench_train.py`` does, whose helpers and flags this script shares) and
   ``--steps`` steps on random tokens are timed after ``--warmup``; reported: median
   step ms, tokens/s and the speed-up of tokens/s over the 1-device mesh (target
   ``--target_speedup``).
2. Same losses: the same global batches (N x per-device rows) of the config's real
   training data, from the same initialisation, train ``--loss_steps`` steps on every
   mesh, the 1-device one included; reported: the losses and their largest relative
   difference from the 1-device losses (pass below ``--loss_tolerance``). The N-device
   meshes reuse their throughput executables (same shapes); only the 1-device mesh
   compiles a second time, for the larger batch.

The learning-rate warm-up is shortened to ``--lr_warmup_steps`` so that the first
updates move the loss (a 5,000-step warm-up leaves it flat and the comparison blind to
the gradient reduction); step time does not depend on the schedule.

The JSON (``--out``) is rewritten after every row, and SIGTERM / Ctrl-C end the run
with the JSON written and the table printed: a run cut short by a time limit still
reports what it measured. Of bench_train's flags, --config, --out, --steps, --warmup
and --smoke apply here; the others are refused.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from scripts.bench_train import (  # noqa: E402
    FLAGS, Bench, config_from_flags, gib, log, memory_report, time_steps)
from sparse_lm import data as data_lib  # noqa: E402
from sparse_lm import distributed, sharding  # noqa: E402
from sparse_lm.attention import resolve_impl  # noqa: E402
from sparse_lm.train import accumulation_batch  # noqa: E402

flags.DEFINE_integer("per_device_batch", 0, "Rows per device on every mesh; 0: the config's data.batch_size.")
flags.DEFINE_list("meshes", ["data", "fsdp"], "N-device meshes to compare with one device: data, fsdp.")
flags.DEFINE_integer("loss_steps", 5, "Train steps on real data whose losses are compared; 0 skips.")
flags.DEFINE_float("loss_tolerance", 2e-2, "Largest relative loss difference from one device that passes.")
flags.DEFINE_float("target_speedup", 1.8, "Tokens/s over one device that an N-device mesh should reach.")
flags.DEFINE_integer("lr_warmup_steps", 2, "optim.warmup_steps for this run; 0 keeps the config's.")
flags.DEFINE_float("stop_after_s", 0.0, "Start no new row after this many seconds (0: no limit); "
                   "rows not started are reported as skipped.")

# bench_train's flags that mean nothing here: refused rather than silently ignored.
_FOREIGN_FLAGS = ("impls", "find_max_batch", "max_batch", "device_memory_gb", "peak_tflops")
ONE = "1 device"


class Interrupted(BaseException):
    """SIGTERM: a BaseException so that no row's ``except Exception`` swallows it."""


def _on_sigterm(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")


def mesh_axes(name: str, n: int) -> tuple[int, int]:
    """(data, fsdp) sizes of a named mesh over ``n`` devices."""
    axes = {ONE: (1, 1), "data": (n, 1), "fsdp": (1, n)}
    if name not in axes:
        raise app.UsageError(f"unknown mesh {name!r} in --meshes; choose data or fsdp.")
    return axes[name]


def mesh_size(name: str, n: int) -> int:
    data, fsdp = mesh_axes(name, n)
    return data * fsdp


def mesh_bench(config: ml_collections.ConfigDict) -> Bench:
    """bench_train's Bench on the first ``data * fsdp * tensor`` devices of this process."""
    m = config.mesh
    return Bench(config, jax.devices()[: m.data * m.fsdp * m.tensor])


def mesh_config(base: ml_collections.ConfigDict, name: str, n: int, global_batch: int) -> ml_collections.ConfigDict:
    """``base`` on the named mesh, training on ``global_batch`` rows."""
    config = copy.deepcopy(base)
    config.mesh.data, config.mesh.fsdp = mesh_axes(name, n)
    config.mesh.tensor = 1
    config.data.batch_size = global_batch
    return config


class Executables:
    """Compiled steps by (mesh, global batch): the N-device meshes' throughput executables
    serve the loss phase too (same shapes), so three meshes take four compilations, not six."""

    def __init__(self):
        self._cache: dict[tuple[str, int], tuple[Bench, Any, float]] = {}

    def get(self, config: ml_collections.ConfigDict, name: str) -> tuple[Bench, Any, float, bool]:
        """(bench, compiled, compile seconds, whether it came from the cache)."""
        key = (name, config.data.batch_size)
        if key in self._cache:
            return (*self._cache[key], True)
        bench = mesh_bench(config)
        t0 = time.perf_counter()
        compiled = bench.compile(config.data.batch_size)
        self._cache[key] = (bench, compiled, time.perf_counter() - t0)
        return (*self._cache[key], False)


def throughput_row(execs: Executables, config: ml_collections.ConfigDict, name: str) -> dict:
    bench, compiled, compile_s, _ = execs.get(config, name)
    b = config.data.batch_size
    times, pipelined, _ = time_steps(bench, compiled, b)
    step_s = statistics.median(times)
    devices = bench.mesh.size
    row = {
        "mesh": name,
        "mesh_shape": dict(bench.mesh.shape),
        "devices": devices,
        "global_batch": b,
        "per_device_batch": b // devices,
        "seq_len": config.data.seq_len,
        "compile_s": compile_s,
        "memory": memory_report(compiled),
        "step_times_s": times,
        "step_s": step_s,
        "pipelined_step_s": pipelined,
        "tokens_per_s": b * config.data.seq_len / step_s,
    }
    log(f"[throughput] {name}: compiled in {compile_s:.1f} s, median step {step_s * 1e3:.1f} ms, "
        f"{row['tokens_per_s']:,.0f} tokens/s")
    return row


def real_batches(config: ml_collections.ConfigDict, global_batch: int, steps: int) -> list[np.ndarray]:
    """The first ``steps`` global batches of the training split, as training reads them.

    No augmentation (CIFAR flips): every mesh gets these very rows anyway."""
    source = data_lib.load_split(config.data, "train")
    iterator = data_lib.TrainIterator(source, global_batch, config.seed)
    return [next(iterator) for _ in range(steps)]


def loss_row(execs: Executables, config: ml_collections.ConfigDict, name: str, batches: list[np.ndarray]) -> dict:
    bench, compiled, compile_s, reused = execs.get(config, name)
    accum = config.optim.grad_accum_steps
    state = bench.init_on_mesh()  # the config's seed: the same values on every mesh
    metrics = []
    for rows in batches:
        batch = sharding.global_batch(accumulation_batch(rows, accum), bench.mesh, extra_leading=1)
        state, m = compiled(state, batch)
        metrics.append({k: m[k] for k in ("loss", "grad_norm")})
    metrics = jax.device_get(metrics)  # one wait at the end: steps queue back to back
    del state
    row = {
        "mesh": name,
        "devices": bench.mesh.size,
        "global_batch": config.data.batch_size,
        "compile_s": 0.0 if reused else compile_s,
        "reused_throughput_executable": reused,
        "losses": [float(m["loss"]) for m in metrics],
        "grad_norms": [float(m["grad_norm"]) for m in metrics],
    }
    log(f"[losses] {name}: " + " ".join(f"{v:.6f}" for v in row["losses"]))
    return row


def summarize(report: dict) -> None:
    """Speed-ups and loss differences against the 1-device rows, and the verdicts."""
    one = next((r for r in report["throughput"] if r["mesh"] == ONE and "tokens_per_s" in r), None)
    for r in report["throughput"]:
        if one and "tokens_per_s" in r:
            r["speedup_vs_one_device"] = r["tokens_per_s"] / one["tokens_per_s"]
    base = next((r for r in report["losses"] if r["mesh"] == ONE and "losses" in r), None)
    for r in report["losses"]:
        if base and "losses" in r and r["mesh"] != ONE:
            rel = [abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"])]
            r["rel_diff_vs_one_device"] = rel
            # np.max propagates NaN (Python's max may not), and NaN never compares below the
            # tolerance: a diverged run fails here too.
            r["max_rel_diff_vs_one_device"] = float(np.max(rel)) if rel else float("nan")
            r["within_tolerance"] = bool(r["max_rel_diff_vs_one_device"] <= report["loss_tolerance"])
    verdicts = {}
    for name in report["meshes"]:
        t = next((r for r in report["throughput"] if r["mesh"] == name), {})
        l = next((r for r in report["losses"] if r["mesh"] == name), {})
        verdicts[name] = {
            "speedup": t.get("speedup_vs_one_device"),
            "speedup_met": (t["speedup_vs_one_device"] >= report["target_speedup"])
            if "speedup_vs_one_device" in t else None,
            "max_rel_loss_diff": l.get("max_rel_diff_vs_one_device"),
            "losses_met": l.get("within_tolerance"),
        }
    report["verdicts"] = verdicts


def write_json(report: dict, path: str) -> None:
    summarize(report)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)  # a kill mid-write leaves the previous version, whole


def table(report: dict) -> str:
    lines = [f"{'mesh':<10}{'dev':>4}{'batch':>7}{'compile s':>11}{'step ms':>10}{'tokens/s':>13}"
             f"{'speed-up':>10}{'mem/dev':>11}"]
    for r in report["throughput"]:
        if "tokens_per_s" not in r:
            lines.append(f"{r['mesh']:<10}  {_failure(r)}")
            continue
        speed = f"{r['speedup_vs_one_device']:.2f}x" if "speedup_vs_one_device" in r else "-"
        lines.append(
            f"{r['mesh']:<10}{r['devices']:>4}{r['global_batch']:>7}{r['compile_s']:>11.1f}"
            f"{r['step_s'] * 1e3:>10.1f}{r['tokens_per_s']:>13,.0f}{speed:>10}"
            f"{gib(r['memory'].get('estimated_peak_bytes')):>11}"
        )
    if report["losses"]:
        lines.append(f"losses on real data, global batch {report['loss_batch']}, "
                     f"relative difference from {ONE} (tolerance {report['loss_tolerance']:.1e}):")
        for r in report["losses"]:
            if "losses" not in r:
                lines.append(f"{r['mesh']:<10}  {_failure(r)}")
                continue
            diff = r.get("max_rel_diff_vs_one_device")
            verdict = "" if diff is None else f"  max {diff:.1e} {'ok' if r['within_tolerance'] else 'FAIL'}"
            lines.append(f"{r['mesh']:<10}" + "".join(f"{v:>10.5f}" for v in r["losses"]) + verdict)
    verdicts = [
        f"{name}: speed-up {_yes_no(v['speedup_met'])}, losses {_yes_no(v['losses_met'])}"
        for name, v in report["verdicts"].items()
    ]
    lines.append(f"targets (speed-up >= {report['target_speedup']:.2f}x, same losses): "
                 + ("; ".join(verdicts) or "no N-device mesh"))
    lines.append(f"status: {report['status']}; {report['elapsed_s']:.0f} s; device {report['device_kind']}")
    return "\n".join(lines)


def _failure(row: dict) -> str:
    return f"skipped: {row['skipped']}" if "skipped" in row else f"failed: {row.get('error', '?')[:90]}"


def _yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def config_summary(config: ml_collections.ConfigDict) -> dict:
    m = config.model
    return {
        "data": config.data.name, "data_path": config.data.path, "seq_len": config.data.seq_len,
        "num_layers": m.num_layers, "d_model": m.d_model, "num_heads": m.num_heads,
        "dtype": m.dtype, "param_dtype": m.param_dtype, "remat": m.remat, "scan_layers": m.scan_layers,
        "attention": f"{config.attention.pattern}/{config.attention.combine}",
        "attention_impl": resolve_impl(config.attention.impl),
        "grad_accum_steps": config.optim.grad_accum_steps,
        "lr_warmup_steps": config.optim.warmup_steps,
        "learning_rate": config.optim.learning_rate,
    }


def run_rows(report: dict, jobs: list, out: str, t0: float) -> None:
    """Runs each (list, name, fn) job into its list; one failing costs only its row."""
    for rows, name, fn in jobs:
        if FLAGS.stop_after_s and time.perf_counter() - t0 > FLAGS.stop_after_s:
            rows.append({"mesh": name, "skipped": f"--stop_after_s={FLAGS.stop_after_s:g} reached"})
        else:
            try:
                rows.append(fn())
            except Exception as e:  # noqa: BLE001 - one mesh failing must not lose the others
                traceback.print_exc()
                rows.append({"mesh": name, "error": f"{type(e).__name__}: {e}"})
            except (Interrupted, KeyboardInterrupt) as e:
                rows.append({"mesh": name, "error": f"interrupted ({e or 'Ctrl-C'})"})
                raise
        report["elapsed_s"] = time.perf_counter() - t0
        write_json(report, out)


def main(argv: list[str]) -> None:
    del argv
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, _on_sigterm)
    foreign = [f"--{f}" for f in _FOREIGN_FLAGS if FLAGS[f].present]
    if foreign:
        raise app.UsageError(f"{', '.join(foreign)}: bench_train flag(s) that bench_scaling does not use.")
    if jax.process_count() > 1:
        raise app.UsageError("bench_scaling compares the devices of one process; run it as a single process.")
    config = config_from_flags()
    if FLAGS.smoke:
        FLAGS.loss_steps = min(FLAGS.loss_steps, 3)
    if FLAGS.lr_warmup_steps > 0:
        config.optim.warmup_steps = FLAGS.lr_warmup_steps
    n = jax.device_count()
    per_device = FLAGS.per_device_batch or config.data.batch_size
    if per_device % config.optim.grad_accum_steps:
        raise app.UsageError(f"--per_device_batch={per_device} must be a multiple of "
                             f"optim.grad_accum_steps={config.optim.grad_accum_steps}.")
    names = list(FLAGS.meshes)
    for name in names:
        mesh_axes(name, n)  # refuses unknown names before anything is compiled
    if n == 1 and names:
        log(f"Only one device: the {', '.join(names)} mesh(es) would equal '{ONE}'; measuring '{ONE}' only.")
        names = []
    device = jax.devices()[0]
    report: dict[str, Any] = {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": n,
        "jax_version": jax.__version__,
        "argv": sys.argv,
        "command": " ".join(sys.argv),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "config_summary": config_summary(config),
        "config": json.loads(config.to_json_best_effort()),
        "per_device_batch": per_device,
        "steps": FLAGS.steps,
        "warmup": FLAGS.warmup,
        "loss_steps": FLAGS.loss_steps,
        "loss_batch": per_device * n,
        "loss_tolerance": FLAGS.loss_tolerance,
        "target_speedup": FLAGS.target_speedup,
        "meshes": names,
        "throughput": [],
        "losses": [],
        "status": "running",
        "elapsed_s": 0.0,
    }
    execs = Executables()
    status = "complete"
    log(f"{distributed.process_summary()}; device kind {device.device_kind!r}; "
        f"{per_device} rows per device, meshes {[ONE, *names]}")
    try:
        run_rows(report, [
            (report["throughput"], name,
             lambda name=name: throughput_row(execs, mesh_config(config, name, n, per_device * mesh_size(name, n)), name))
            for name in [ONE, *names]
        ], FLAGS.out, t0)
        if FLAGS.loss_steps > 0:
            batches = real_batches(config, report["loss_batch"], FLAGS.loss_steps)
            # The 1-device mesh takes all N devices' rows: the same global batch everywhere.
            run_rows(report, [
                (report["losses"], name,
                 lambda name=name: loss_row(execs, mesh_config(config, name, n, report["loss_batch"]), name, batches))
                for name in [ONE, *names]
            ], FLAGS.out, t0)
    except (Interrupted, KeyboardInterrupt) as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the report short
        status = f"interrupted ({e or 'Ctrl-C'})"
        log(f"Interrupted: {status}; writing what was measured.")
    except Exception as e:  # noqa: BLE001 - e.g. unreadable data: still report the throughput
        traceback.print_exc()
        status = f"failed: {type(e).__name__}: {e}"
    report["status"] = status
    report["elapsed_s"] = time.perf_counter() - t0
    write_json(report, FLAGS.out)
    log(f"JSON: {os.path.abspath(FLAGS.out)}")
    log("\n" + table(report))
    errors = any("error" in r for r in report["throughput"] + report["losses"])
    if status != "complete" or errors:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
