"""Figures of training runs: validation bits per byte against steps and wall-clock time."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sparse_lm.metrics import read_metrics


def training_start(records: list[dict]) -> dict:
    """The record training time counts from: the first ``compiled`` record (written once
    the first step, which carries the compilation, has finished), or the first record in
    runs written before that record existed."""
    return next((r for r in records if r["kind"] == "compiled"), records[0])


def training_clock(records: list[dict]) -> list[float]:
    """Seconds of training at each record, in file order. Each session of a run (the
    first, and each resume) counts from its ``compiled`` record and adds to the sessions
    before it, so the time between sessions, a resumed process's start-up and its
    recompilation do not count as training. Records before a session's ``compiled``
    record are at that session's start."""
    clock, offset, start, last, sessions = [], 0.0, records[0]["time"], records[0]["time"], 0
    for r in records:
        if r["kind"] == "compiled":
            if sessions:
                offset += last - start  # the previous session ended at its last record
            start, sessions = r["time"], sessions + 1
        clock.append(offset + max(0.0, r["time"] - start))
        last = r["time"]
    return clock


def run_curve(workdir: str | Path, split: str = "valid") -> tuple[list[int], list[float], list[float]]:
    """(steps, seconds of training (``training_clock``), bits per byte) of a run's
    evaluations."""
    records = read_metrics(workdir)
    if not records:
        raise ValueError(f"{workdir} has no metrics.jsonl; is it a training run's folder?")
    clock = training_clock(records)
    evals = [(r, t) for r, t in zip(records, clock) if r["kind"] == f"eval_{split}"]
    if not evals:
        raise ValueError(f"{workdir} has no eval_{split} records; train with train.eval_every > 0.")
    return (
        [r["step"] for r, _ in evals],
        [t for _, t in evals],
        [r["bits_per_byte"] for r, _ in evals],
    )


def plot_runs(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str = "",
    split: str = "valid",
) -> tuple[Path, str]:
    """Writes a two-panel PNG (against steps, against time); returns it and a text table."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs; give one label per run.")
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    rows = [f"{'run':<20} {'steps':>7} {'minutes':>8} {'final bpb':>10} {'best bpb':>9}"]
    for run, label in zip(runs, labels):
        steps, seconds, bpb = run_curve(run, split)
        by_step.plot(steps, bpb, marker="o", markersize=3, label=label)
        by_time.plot([s / 60 for s in seconds], bpb, marker="o", markersize=3, label=label)
        rows.append(f"{label:<20} {steps[-1]:>7} {seconds[-1] / 60:>8.1f} {bpb[-1]:>10.4f} {min(bpb):>9.4f}")
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall-clock minutes")
    by_step.set_ylabel(f"{split} bits per byte")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out, "\n".join(rows)
