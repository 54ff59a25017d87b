"""Train dense, strided and fixed models on real data and compare them: plots, table, samples.

    python scripts/compare_patterns.py --workdir runs/quality --plots docs/quality \
        [--suites text,enwik8,cifar10,music] [--patterns dense,strided,fixed] \
        [--gpus 0,1] [--deadline_s 3600] [--samples] [--smoke] [-- --config.train.num_steps=200]

Each (suite, pattern) is one ``scripts/train.py`` run of ``configs/quality.py:SUITE,PATTERN``
in ``WORKDIR/SUITE/PATTERN`` (log beside it), so a run can be resumed, evaluated or
sampled like any other. With ``--gpus`` the runs are spread over those GPUs, one run per
GPU at a time (``CUDA_VISIBLE_DEVICES``), so every run has a card to itself and its
wall-clock time is its own. Arguments after ``--`` go to every run (config overrides).

At ``--deadline_s`` (seconds from the start), or when this script gets SIGTERM, running
trainings get SIGTERM, save a checkpoint and stop (resumable); runs not started are
reported as such, and the plots and summary are still written. Then, per suite:
``PLOTS/SUITE.png`` (validation bits per byte against steps and against wall-clock time),
and ``WORKDIR/summary.json`` and ``PLOTS/summary.md`` with each run's final and best
validation figure, steps, training minutes, tokens per second and the gap to dense at
equal steps. ``--samples`` also samples from each suite's best run into
``PLOTS/samples/SUITE/`` (text, a PNG grid, or WAV).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.quality import PATTERNS, SUITES  # noqa: E402
from sparse_lm.metrics import read_metrics  # noqa: E402
from sparse_lm.plots import plot_runs, training_clock, training_start  # noqa: E402

TITLES = {
    "text": "Python stdlib sources, T=2,048",
    "enwik8": "enwik8 (1 MB sample), T=12,288",
    "cifar10": "CIFAR-10 (4,000-image sample), T=3,072",
    "music": "orchestral music, 12 kHz mu-law, T=65,536",
}


def config_arg(suite: str, pattern: str, smoke: bool) -> str:
    return f"{REPO / 'configs' / 'quality.py'}:{suite},{pattern}{',smoke' if smoke else ''}"


class Deadline:
    """When running jobs are stopped and no new ones start; SIGTERM to this script moves it
    to now, so runs still save, and the summary is still written."""

    def __init__(self, seconds: float):
        self.at = time.time() + seconds

    def passed(self) -> bool:
        return time.time() > self.at

    def now(self, *_) -> None:
        self.at = time.time()


class Job:
    """One subprocess (a training or a sampling) with its log, run on one slot."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.status = "not run"  # -> "done" | "stopped at deadline" | "failed (exit N)"
        self.seconds = 0.0
        self.proc: subprocess.Popen | None = None

    def run(self, gpu: str | None, deadline: Deadline) -> None:
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        # Appended: a run resumed by running the script again keeps its earlier sessions' log.
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=REPO)
            stopped = False
            while self.proc.poll() is None:
                if deadline.passed() and not stopped:
                    self.proc.send_signal(signal.SIGTERM)  # train.py saves and exits 3
                    stopped = True
                time.sleep(0.5)
        self.seconds = time.time() - t0
        rc = self.proc.returncode
        self.status = ("done" if rc == 0 else "stopped at deadline" if stopped or rc == 3
                       else f"failed (exit {rc}; see {self.log_path})")
        print(f"[{gpu if gpu is not None else 'cpu'}] {self.name}: {self.status} "
              f"in {self.seconds:.0f} s", flush=True)


def run_all(jobs: list[Job], slots: list[str | None], deadline: Deadline) -> None:
    """Runs jobs in order, one per slot at a time; jobs left at the deadline are not started."""
    todo: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        todo.put(job)

    def worker(slot: str | None) -> None:
        while not deadline.passed():
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                job.run(slot, deadline)
            except Exception as e:  # a broken job must not take the others down
                job.status = f"failed ({type(e).__name__}: {e})"

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_summary(workdir: Path) -> dict | None:
    """Final and best validation figures, steps, training time and throughput of a run."""
    records = read_metrics(workdir)
    clock = training_clock(records) if records else []
    evals = [(r, t) for r, t in zip(records, clock) if r["kind"] == "eval_valid"]
    if not evals:
        return None
    start = training_start(records)
    train = [r for r in records if r["kind"] == "train" and "tokens_per_second" in r]
    return {
        "steps": evals[-1][0]["step"],
        "final_bpb": evals[-1][0]["bits_per_byte"],
        "best_bpb": min(r["bits_per_byte"] for r, _ in evals),
        "train_minutes": evals[-1][1] / 60,
        "compile_seconds": start.get("seconds"),
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in train) if train else None,
        "curve": [(r["step"], round(t, 2), r["bits_per_byte"]) for r, t in evals],
    }


def dense_gap_at_equal_steps(summary: dict) -> dict:
    """Sparse final bpb minus dense bpb at the sparse run's last evaluated step."""
    gaps = {}
    dense = summary.get("dense")
    if not dense:
        return gaps
    dense_at = {step: bpb for step, _, bpb in dense["curve"]}
    for name, s in summary.items():
        if name != "dense" and s and s["steps"] in dense_at:
            gaps[name] = s["final_bpb"] - dense_at[s["steps"]]
    return gaps


def markdown(results: dict, device: str) -> str:
    lines = [f"Card: {device}. Validation bits per byte (bits per dim for CIFAR-10); "
             "minutes of training after compilation, evaluations included.", "",
             "| suite | pattern | steps | final bpb | best bpb | minus dense | minutes | tokens/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for suite, r in results.items():
        for pattern, s in r["runs"].items():
            if s is None:
                lines.append(f"| {suite} | {pattern} | {r['status'][pattern]} | | | | | |")
                continue
            gap = r["gap_to_dense"].get(pattern)
            tps = "" if s["tokens_per_second"] is None else f"{s['tokens_per_second']:,.0f}"
            lines.append(
                f"| {suite} | {pattern} | {s['steps']} | {s['final_bpb']:.4f} | {s['best_bpb']:.4f} | "
                f"{'' if gap is None else f'{gap:+.4f}'} | {s['train_minutes']:.2f} | {tps} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="folder for the runs (WORKDIR/SUITE/PATTERN)")
    ap.add_argument("--plots", required=True, help="folder for the PNGs, summary.md and samples")
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--gpus", default="", help="GPU ids to spread runs over, e.g. 0,1 (default: one at a time)")
    ap.add_argument("--deadline_s", type=float, default=float("inf"))
    ap.add_argument("--samples", action="store_true", help="sample from each suite's best run")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU-sized models (tests)")
    args = ap.parse_args(argv)
    for name, chosen, allowed in (("suites", args.suites, SUITES), ("patterns", args.patterns, PATTERNS)):
        bad = [x for x in chosen.split(",") if x not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    start = time.time()
    deadline = Deadline(args.deadline_s)
    workdir, plots = Path(args.workdir).resolve(), Path(args.plots).resolve()
    suites, patterns = args.suites.split(","), args.patterns.split(",")
    slots: list[str | None] = args.gpus.split(",") if args.gpus else [None]
    signal.signal(signal.SIGTERM, deadline.now)

    trains = {}
    for suite in suites:
        for pattern in patterns:
            run_dir = workdir / suite / pattern
            argv_ = [sys.executable, str(REPO / "scripts" / "train.py"),
                     f"--config={config_arg(suite, pattern, args.smoke)}", f"--workdir={run_dir}", *extra]
            trains[suite, pattern] = Job(f"train {suite} {pattern}", argv_, workdir / suite / f"{pattern}.log")
    run_all(list(trains.values()), slots, deadline)

    results = {}
    for suite in suites:
        runs = {p: run_summary(workdir / suite / p) for p in patterns}
        status = {p: trains[suite, p].status for p in patterns}
        done = [p for p in patterns if runs[p] is not None]
        plot = None
        if done:
            plot, table = plot_runs([workdir / suite / p for p in done], plots / f"{suite}.png",
                                    labels=done, title=TITLES[suite])
            print(f"\n{suite}:\n{table}")
        results[suite] = {"runs": runs, "status": status, "gap_to_dense": dense_gap_at_equal_steps(runs),
                          "plot": None if plot is None else str(plot)}

    if args.samples:
        samplers = []
        for suite, r in results.items():
            done = {p: s for p, s in r["runs"].items() if s is not None}
            if not done:
                continue
            best = min(done, key=lambda p: done[p]["final_bpb"])
            out = plots / "samples" / suite
            argv_ = [sys.executable, str(REPO / "scripts" / "sample.py"),
                     f"--config={config_arg(suite, best, args.smoke)}", f"--workdir={workdir / suite / best}",
                     f"--output={out}", *extra]
            job = Job(f"sample {suite} {best}", argv_, workdir / suite / f"sample_{best}.log")
            r["sample"] = {"pattern": best, "folder": str(out), "job": job}
            samplers.append(job)
        run_all(samplers, slots, deadline)
        for r in results.values():
            if "sample" in r:
                job = r["sample"].pop("job")
                r["sample"]["status"] = job.status
                r["sample"]["files"] = sorted(str(p) for p in Path(r["sample"]["folder"]).glob("*"))

    device = detect_device(slots)
    plots.mkdir(parents=True, exist_ok=True)
    (plots / "summary.md").write_text(markdown(results, device))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "summary.json").write_text(json.dumps(
        {"device": device, "argv": sys.argv, "extra": extra, "seconds": time.time() - start,
         "results": results}, indent=1, default=str))
    print("\n" + markdown(results, device))
    failed = [j.name for j in trains.values() if j.status.startswith("failed")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def detect_device(slots: list[str | None]) -> str:
    """The card's name, from nvidia-smi where there is one (this process never touches it)."""
    if slots == [None]:
        return os.environ.get("SPARSE_LM_DEVICE_NAME", "CPU")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
        return out.strip() or "GPU"
    except (OSError, subprocess.SubprocessError):
        return "GPU"


if __name__ == "__main__":
    sys.exit(main())
