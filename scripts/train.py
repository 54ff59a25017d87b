"""Train a Sparse Transformer from a config; resume from --workdir's latest checkpoint.

    python scripts/train.py --config configs/quickstart.py --workdir runs/quickstart \
        [--config.train.num_steps=500 ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app  # noqa: E402

from sparse_lm import cli  # noqa: E402

cli.define_common_flags()


def main(argv):
    del argv

    def run():
        from sparse_lm.metrics import log
        from sparse_lm.train import train_and_evaluate

        cli.initialize_distributed()
        summary = train_and_evaluate(cli.FLAGS.config, cli.FLAGS.workdir)
        if summary["status"] == "preempted":
            return 3
        ev = summary["eval"]
        figure = (f"valid bits per byte {ev['bits_per_byte']:.4f}" if "bits_per_byte" in ev
                  else "no validation figure logged")
        if summary["steps_run"] == 0:  # started again after the last step
            figure = (f"already finished, nothing left to train (raise train.num_steps to go "
                      f"on); last logged {figure}" + (f" at step {ev['step']}" if "step" in ev else ""))
        log(
            f"Done at step {summary['step']}: {figure}.\n"
            f"  checkpoints: {summary['checkpoints']}\n  metrics:     {summary['metrics']}"
        )
        return 0

    sys.exit(cli.run_reporting_errors(run))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
