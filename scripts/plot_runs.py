"""Plot validation bits per byte of several runs against steps and against wall-clock time.

    python scripts/plot_runs.py runs/dense runs/strided runs/fixed --out docs/text.png \
        [--title "enwik8, 4 layers"] [--labels dense strided fixed]

Reads each run's metrics.jsonl (written by scripts/train.py). Wall-clock time is
measured from each run's first record, so runs made at different times line up; time
spent in evaluation and checkpointing is included, as a user waiting for a run sees it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_lm.plots import plot_runs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--labels", nargs="*", help="one label per run (default: folder names)")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--split", default="valid", help="which eval split to plot")
    args = parser.parse_args()
    try:
        path, table = plot_runs(args.runs, args.out, labels=args.labels, title=args.title, split=args.split)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
