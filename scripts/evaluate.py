"""Evaluate a checkpoint in bits per byte over a whole split; writes eval_<split>_<step>.json.

    python scripts/evaluate.py --config configs/quickstart.py --workdir runs/quickstart \
        [--split valid|test] [--checkpoint_step S]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from sparse_lm import cli  # noqa: E402

cli.define_common_flags()
flags.DEFINE_enum("split", "valid", ["train", "valid", "test"], "Split to evaluate.")
flags.DEFINE_integer("checkpoint_step", None, "Step to evaluate (default: the latest).")
flags.DEFINE_integer("max_batches", 0, "Evaluate only the first N batches (0: the whole split).")
flags.DEFINE_integer(
    "min_context", 0,
    "Predict every byte with at least this many bytes of context, by overlapping windows "
    "(the paper's longer-context evaluation; 0: non-overlapping windows).",
)


def main(argv):
    del argv

    def run():
        from sparse_lm.evaluate import evaluate_checkpoint
        from sparse_lm.metrics import log

        cli.initialize_distributed()
        F = cli.FLAGS
        result = evaluate_checkpoint(
            F.config, F.workdir, split=F.split, step=F.checkpoint_step, max_batches=F.max_batches,
            min_context=F.min_context,
        )
        log(
            f"{F.split} bits per byte at step {result['step']}: {result['bits_per_byte']:.4f} "
            f"over {result['num_bytes']:,} bytes"
            + (f" (its first {F.max_batches} batches only)" if F.max_batches else "")
            + f" -> {result.get('path', '')}"
        )
        return 0

    sys.exit(cli.run_reporting_errors(run))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
