"""Where the device time goes: run a function under the JAX profiler and sum kernel time.

``profile(fn, out_dir, steps)`` traces ``steps`` calls of ``fn`` with ``jax.profiler``
(Perfetto JSON next to the XPlane files, so the trace also opens in Perfetto / XProf),
and ``kernel_breakdown(trace_dir)`` reads that trace back: the device's kernels, summed
per name and per category (attention kernels, matmuls, fusions, copies, RNG,
collectives), per step. The categories are regular expressions over kernel names, the
only thing a trace says about a kernel, so they are a guide: the per-name table beside
them is the ground truth.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax

# First match wins; the names are what XLA, cuBLAS/cuDNN, Triton and Mosaic GPU give
# their kernels on NVIDIA GPUs (lower-cased before matching).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"sparse_attn|mosaic|attn|fmha|flash|cudnn|sdpa|softmax_fwd|_mha"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|\bdot\b|matmul|wgmma|sm90_"),
    ("collective", r"nccl|all-?reduce|all-?gather|reduce-?scatter|collective"),
    ("rng", r"rng|philox|threefry|random"),
    ("copy", r"memcpy|memset|copy|transpose|dynamic.update.slice|concatenate"),
    ("reduction", r"reduce|scatter"),
    ("fusion", r"fusion|loop_|elementwise"),
)


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, pat in CATEGORIES if re.search(pat, low)), "other")


def profile(fn: Callable[[], Any], out_dir: str, steps: int = 3) -> str:
    """Runs ``fn()`` (already compiled and warm) ``steps`` times under the profiler.

    Returns the folder holding the Perfetto trace. ``fn``'s result is waited on after
    every call so that each step's kernels end inside the trace.
    """
    os.makedirs(out_dir, exist_ok=True)
    jax.block_until_ready(fn())  # nothing of compilation or warm-up in the trace
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(fn())
    return out_dir


def _trace_file(trace_dir: str) -> str:
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(
            f"no perfetto_trace.json.gz under {trace_dir!r}: profile with "
            "jax.profiler.trace(..., create_perfetto_trace=True) (sparse_lm.profiling.profile does)")
    return found[-1]


def _device_kernel_events(events: list[dict]) -> list[dict]:
    """Complete events of the device's streams (not the host, not XLA's op/module lines,
    which repeat the kernels' time under other names)."""
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {p for p, n in procs.items() if re.search(r"/device:(GPU|TPU)", n)}
    out = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids]
    streams = [e for e in out if re.match(r"stream", threads.get((e["pid"], e.get("tid")), ""), re.I)]
    # GPU traces put kernels on "Stream #N" lines; a backend without those lines keeps all.
    return streams or [e for e in out if not re.search(
        r"xla (ops|modules)|steps", threads.get((e["pid"], e.get("tid")), ""), re.I)]


def _busy_us(kernels: list[dict]) -> float:
    """Time covered by at least one kernel (the union of their intervals): kernels that
    overlap on several streams of one device count once."""
    spans = sorted((float(e.get("ts", 0.0)), float(e.get("ts", 0.0)) + float(e.get("dur", 0.0)))
                   for e in kernels)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def kernel_breakdown(trace_dir: str, steps: int = 1, top: int = 20) -> dict:
    """Device kernel time of a trace, per step and per device: total, per category, and
    the top names.

    Returns ``{"device_ms", "busy_ms", "devices", "by_category": {cat: ms}, "top":
    [(name, ms, calls)], "kernels"}``: kernel times summed, then divided by ``steps``
    and by the number of devices in the trace (a process driving 8 GPUs reports the
    average GPU); ``busy_ms`` is the time some kernel ran (overlapping streams counted
    once), so busy_ms / wall time is the device's busy share. Raises if the trace holds
    no device kernels (a CPU run, or a profiler without device support): there is then
    nothing to break down, and a table of zeros would mislead.
    """
    with gzip.open(_trace_file(trace_dir), "rt") as fh:
        data = json.load(fh)
    events = data["traceEvents"] if isinstance(data, dict) else data
    kernels = _device_kernel_events(events)
    if not kernels:
        raise ValueError(f"the trace under {trace_dir!r} has no device kernel events "
                         "(CPU backend, or the profiler could not read the device)")
    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    per_device: dict[Any, list[dict]] = collections.defaultdict(list)
    for e in kernels:
        per_name[e["name"]][0] += float(e.get("dur", 0.0))
        per_name[e["name"]][1] += 1
        per_device[e["pid"]].append(e)
    by_cat: dict[str, float] = collections.defaultdict(float)
    for name, (us, _) in per_name.items():
        by_cat[category(name)] += us
    n_dev = len(per_device)
    ms = 1e-3 / steps / n_dev
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    return {
        "device_ms": sum(us for us, _ in per_name.values()) * ms,
        "busy_ms": sum(_busy_us(evs) for evs in per_device.values()) * ms,
        "devices": n_dev,
        "by_category": {c: v * ms for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top": [(n, us * ms, calls / steps / n_dev) for n, (us, calls) in ranked[:top]],
        "kernels": len(per_name),
    }


def format_breakdown(title: str, b: dict, wall_ms: float | None = None,
                     sources: dict[str, list[tuple[str, int]]] | None = None) -> str:
    """A short table: categories, then the top kernel names (names cut to 70 chars), each
    followed by where its work comes from in the source when ``sources`` (from
    ``hlo_sources``) knows the kernel."""
    busy = b.get("busy_ms", b["device_ms"])
    lines = [f"{title}: device kernels {b['device_ms']:.3f} ms/step"
             + (f" of {wall_ms:.3f} ms wall ({busy / wall_ms:.0%} busy)" if wall_ms else "")
             + (f", average of {b['devices']} devices" if b.get("devices", 1) > 1 else "")]
    lines += [f"  {cat:<11} {v:9.3f} ms  {v / b['device_ms']:6.1%}" for cat, v in b["by_category"].items()]
    for name, ms, calls in b["top"]:
        line = f"    {ms:9.3f} ms  x{calls:<6g} {name[:70]}"
        if sources and sources.get(name):
            line += "  <- " + ", ".join(f"{where} ({n})" for where, n in sources[name])
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------- kernels -> source lines
#
# A trace names XLA's kernels after the HLO instructions they run (a fusion
# ``loop_multiply_fusion.29`` runs as kernel ``loop_multiply_fusion_29``), and the
# optimized HLO keeps, for every instruction, the Python source line that produced it:
# either inline (``source_file=... source_line=...``) or, in newer XLA, as a
# ``stack_frame_id`` into tables at the top of the module text. ``hlo_sources`` joins the
# two, so a profile's top kernels can say which lines of the model they are.

_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_CALLS = re.compile(r"calls=\{?([^}]*?)\}?(?:, [a-z_]+=|$)")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[\w./\-]+)')


def _fields(text: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in _FIELD.findall(text)}


def _where(path: str, line: str, function: str = "") -> str:
    return f"{os.path.basename(path)}:{line}" + (f" {function}" if function else "")


def _library(path: str) -> bool:
    return "site-packages" in path or "dist-packages" in path


def hlo_sources(hlo_text: str, top: int = 3) -> dict[str, list[tuple[str, int]]]:
    """Kernel name -> [(source, instructions)]: where the kernel's work comes from.

    For every instruction of an optimized HLO module (``jax.stages.Compiled.as_text()``),
    keyed by the kernel name a trace gives it ('.' -> '_'), the ``top`` source locations
    ('model.py:91 LayerNorm.__call__') of the instructions it computes, most instructions
    first: a fusion's are those of its fused computations, another instruction's its own.
    A location is the innermost stack frame outside installed packages (the model's line
    rather than Flax's or JAX's). Instructions without source metadata are left out.
    """
    tables: dict[str, dict[str, str]] = {}
    table = None
    computations: dict[str, list[tuple[str, list[str], str | None]]] = {}
    current = None
    for raw in hlo_text.splitlines():
        line = raw.rstrip()
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = tables.setdefault(line, {})
            continue
        if table is not None:
            m = _TABLE_ROW.match(line)
            if m:
                table[m.group(1)] = m.group(2)
                continue
            table = None
        m = _COMPUTATION.match(line)
        if m and " = " not in line.split("{")[0]:
            current = computations.setdefault(m.group(1), [])
            continue
        if line == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            calls = _CALLS.search(line)
            called = ([c.strip().lstrip("%") for c in calls.group(1).split(",") if c.strip()]
                      if calls else [])
            meta = line.split("metadata={", 1)[1].rsplit("}", 1)[0] if "metadata={" in line else ""
            current.append((m.group(1), called, meta or None))

    def frame_location(frame_id: str) -> str | None:
        # Rows are numbered from 1; a row's parent_frame_id is printed as the parent's
        # row + 1 (XLA stores parents from 0 and prints them shifted), so 1 means none.
        frames, locs = tables.get("StackFrames", {}), tables.get("FileLocations", {})
        files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
        first = None
        seen = set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            frame = _fields(frames[frame_id])
            loc = _fields(locs.get(frame.get("file_location_id", ""), "").strip("{}"))
            path = files.get(loc.get("file_name_id", ""), "").strip('"')
            where = _where(path, loc.get("line", "?"), functions.get(loc.get("function_name_id", ""), "").strip('"'))
            first = first or where
            if path and not _library(path):
                return where
            parent = int(frame.get("parent_frame_id", "0") or 0) - 1
            frame_id = str(parent) if parent >= 1 else ""
        return first

    def location(meta: str | None) -> str | None:
        if not meta:
            return None
        f = _fields(meta)
        if "stack_frame_id" in f:
            return frame_location(f["stack_frame_id"])
        if "source_file" in f:
            return _where(f["source_file"], f.get("source_line", "?"))
        return None

    def counts(names: list[str], into: collections.Counter, depth: int = 0) -> None:
        for comp in names:
            for _, called, meta in computations.get(comp, ()):
                where = location(meta)
                if where:
                    into[where] += 1
                if called and depth < 8:
                    counts(called, into, depth + 1)

    out: dict[str, list[tuple[str, int]]] = {}
    for instructions in computations.values():
        for name, called, meta in instructions:
            c: collections.Counter = collections.Counter()
            counts(called, c)
            if not c and location(meta):
                c[location(meta)] += 1
            if c:
                out[name.replace(".", "_")] = c.most_common(top)
    return out


class StepWindowTrace:
    """Traces steps ``first .. first + steps - 1`` (numbered from 1) of a running loop.

    Call ``before(step)`` with the number of the step about to run and ``after(step,
    result)`` when it has been dispatched; the trace starts before the first step of the
    window (after waiting for the work before it) and stops after its last, once that
    step's ``result`` is ready. ``report`` then holds the wall time and, on a GPU or TPU,
    the device kernel time of the window per step and the share of the wall time the
    device was busy: below ~90% in a training loop points at the input pipeline, host
    work between steps or synchronisation, not the kernels. Whatever the loop does inside
    the window counts (an evaluation or checkpoint step there shows up as idle or extra
    kernels): pick a window between them. ``close()`` stops a trace whose window was
    cut short (the run ended, stopped or failed inside it).
    """

    def __init__(self, out_dir: str, first: int, steps: int):
        self.out_dir, self.first, self.last = out_dir, first, first + steps - 1
        self.steps = steps
        self.report: dict | None = None
        self._t0 = 0.0

    @property
    def active(self) -> bool:
        return self.first > 0 and self.report is None

    def before(self, step: int, pending: Any = None) -> None:
        if self.active and self._t0 == 0.0 and step >= self.first:
            # A window that starts before this process's first traced step (a resumed
            # run, or the compiling first step skipped) moves to this step.
            self.first, self.last = step, step + self.steps - 1
            jax.block_until_ready(pending)  # the window holds its own steps' work only
            os.makedirs(self.out_dir, exist_ok=True)
            jax.profiler.start_trace(self.out_dir, create_perfetto_trace=True)
            self._t0 = time.perf_counter()

    def after(self, step: int, result: Any) -> dict | None:
        """The window's report once ``step`` is its last, else None."""
        if not self.active or step != self.last or self._t0 == 0.0:
            return None
        jax.block_until_ready(result)
        wall_ms = (time.perf_counter() - self._t0) * 1e3 / self.steps
        jax.profiler.stop_trace()
        report: dict = {"first_step": self.first, "steps": self.steps, "wall_ms_per_step": wall_ms,
                        "trace_dir": self.out_dir}
        try:
            b = kernel_breakdown(self.out_dir, steps=self.steps, top=10)
            report.update(device_ms_per_step=b["device_ms"], device_busy=b["busy_ms"] / wall_ms,
                          devices=b["devices"], by_category=b["by_category"], top=b["top"])
        except (ValueError, FileNotFoundError) as e:  # CPU: no device kernels to sum
            report["error"] = str(e)
        self.report = report
        return report

    def close(self) -> None:
        """Stops the profiler if this window started it and did not finish."""
        if self._t0 != 0.0 and self.report is None:
            jax.profiler.stop_trace()
            self.report = {"first_step": self.first, "steps": self.steps, "trace_dir": self.out_dir,
                           "error": "the run ended inside the window; the trace holds what ran"}


class CompileWatch:
    """Notices when a jitted function compiles again after its first compilation.

    A training step should compile once: a second compilation means its inputs changed
    shape, dtype or sharding between steps (a ragged last batch, a Python scalar where an
    array was, a state that moved devices), and each one stalls training for as long as
    the first compile took. ``check()`` returns a message the first time the count
    grows past ``expected``, else None. Uses the jitted function's compilation cache
    size; where that is not available (other JAX versions) it stays silent.
    """

    def __init__(self, jitted: Any, expected: int = 1):
        self._size = getattr(jitted, "_cache_size", None)
        self.expected = expected
        self.reported = False

    def count(self) -> int | None:
        return self._size() if callable(self._size) else None

    def check(self) -> str | None:
        n = self.count()
        if self.reported or n is None or n <= self.expected:
            return None
        self.reported = True
        return (f"the train step has compiled {n} times: its inputs changed shape, dtype or "
                "sharding between steps, and every recompilation stalls training. Check that "
                "every batch has the same shape (drop a ragged last batch) and that the state "
                "keeps its sharding.")


def with_sources(breakdown: dict, hlo_text: str) -> dict:
    """``breakdown`` (``kernel_breakdown``'s) plus "sources": its top kernels' source
    lines from the optimized HLO text of the program it traced (``hlo_sources``)."""
    sources = hlo_sources(hlo_text)
    return {**breakdown, "sources": {n: sources[n] for n, _, _ in breakdown["top"] if n in sources}}
