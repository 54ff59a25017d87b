"""Where training and evaluation figures go: the console, ``metrics.jsonl`` and TensorBoard.

Only process 0 writes. Each record is one JSON object per line with ``step``,
``kind`` ("train" or "eval_<split>") and the figures, so runs can be plotted or
compared with nothing but the standard library.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, total_steps: int, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.total_steps = total_steps
        self.is_writer = jax.process_index() == 0
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self._tb = None
        self._start_time = time.time()
        self._start_step: int | None = None
        if self.is_writer:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        values = {k: _to_python(v) for k, v in values.items()}
        record = {"step": step, "kind": kind, "time": time.time(), **values}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
            self._tb.flush()

    def progress(self, step: int, values: dict[str, Any]) -> None:
        """One console line: step, ETA from the rate since this process started."""
        if not self.is_writer:
            return
        if self._start_step is None:
            self._start_step, self._start_time = step, time.time()
            eta = "--:--"
        else:
            rate = (step - self._start_step) / max(time.time() - self._start_time, 1e-9)
            eta = _format_duration((self.total_steps - step) / rate) if rate > 0 else "--:--"
        width = len(str(self.total_steps))
        shown = "  ".join(f"{k} {_short(v)}" for k, v in values.items())
        print(f"step {step:>{width}}/{self.total_steps}  {shown}  eta {eta}", flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path, kind: str | None = None) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # blank, or the last line of a run killed while writing it
    return [r for r in records if kind is None or r["kind"] == kind]


def _to_python(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "size", 2) == 1:
        return v.item()
    return v


def _short(v: Any) -> str:
    v = _to_python(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def log(message: str) -> None:
    """A console message from process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)
