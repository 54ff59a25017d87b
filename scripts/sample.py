"""Sample long sequences from a checkpoint: .txt for text, a PNG grid for CIFAR-10, .wav for audio.

    python scripts/sample.py --config configs/quickstart.py --workdir runs/quickstart \
        --num_samples 4 --length 256 --output runs/quickstart/samples \
        [--temperature 0.8] [--top_k 0] [--top_p 1.0] [--prompt_from_split valid | --prompt "def "]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from sparse_lm import cli  # noqa: E402

cli.define_common_flags()
flags.DEFINE_integer("num_samples", None, "Samples to draw (default: config.sample.num_samples).")
flags.DEFINE_integer("length", 0, "Bytes per sample, prompt included (default: the context).")
flags.DEFINE_string("output", None, "Folder for the sample files (default: <workdir>/samples).")
flags.DEFINE_float("temperature", None, "Softmax temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", None, "Keep only the k most likely bytes (0: all).")
flags.DEFINE_float("top_p", None, "Nucleus sampling mass (1.0: all).")
flags.DEFINE_integer("seed", 0, "Random seed for sampling and prompt choice.")
flags.DEFINE_string("prompt_from_split", None, "Prompt with the start of examples of this split.")
flags.DEFINE_string("prompt", None, "Text prompt (text models only).")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to sample from (default: the latest).")


def main(argv):
    del argv

    def run():
        from sparse_lm.metrics import log
        from sparse_lm.sample import sample_from_checkpoint

        cli.initialize_distributed()
        F = cli.FLAGS
        s = F.config.sample
        manifest = sample_from_checkpoint(
            F.config,
            F.workdir,
            F.output or str(Path(F.workdir) / "samples"),
            num_samples=s.num_samples if F.num_samples is None else F.num_samples,
            length=F.length,
            temperature=s.temperature if F.temperature is None else F.temperature,
            top_k=s.top_k if F.top_k is None else F.top_k,
            top_p=s.top_p if F.top_p is None else F.top_p,
            seed=F.seed,
            prompt_from_split=F.prompt_from_split,
            prompt_text=F.prompt,
            checkpoint_step=F.checkpoint_step,
        )
        log(
            f"Wrote {len(manifest['files'])} file(s) from step {manifest['step']} "
            f"({manifest['seconds']:.1f} s):\n  " + "\n  ".join(manifest["files"])
        )
        return 0

    sys.exit(cli.run_reporting_errors(run))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
