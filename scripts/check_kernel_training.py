"""GPU check: the first training steps give the same losses with the kernel as with the reference.

    python scripts/check_kernel_training.py --data path/to/enwik8_sample --out result.json \
        [--steps 8] [--seq_len 3072] [--layers 2] [--impls reference pallas_gpu pallas_gpu+mosaic_forward]

Trains the enwik8 config (fewer layers, a context the masked-dense reference can hold
in memory) from the same initialisation on the same batches once per attention
implementation, through the real training loop, and compares the per-step losses. An impl
may set boolean kernel options after a '+': ``pallas_gpu+mosaic_forward`` sets
``attention.mosaic_forward`` to True, ``pallas_gpu+colaunch=false+narrow_chain=false`` turns
two default-on options off. Every spec is checked before the first run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from configs.enwik8 import get_config  # noqa: E402
from sparse_lm.config import ConfigError, parse_impl_variant  # noqa: E402
from sparse_lm.metrics import read_metrics  # noqa: E402
from sparse_lm.train import train_and_evaluate  # noqa: E402


def parse_spec(spec: str, attention) -> tuple[str, dict[str, bool]]:
    """'impl+name[=true|false]+...' -> (impl, {name: value}); exits naming the problem."""
    try:
        return parse_impl_variant(spec, attention)
    except ConfigError as e:
        raise SystemExit(f"--impls {e}") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="enwik8 file (the 1 MB sample will do)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impls", nargs="+", default=["reference", "pallas_gpu"])
    args = parser.parse_args()

    attention = get_config("small").attention
    specs = [parse_spec(spec, attention) for spec in args.impls]
    runs = {}
    for spec, (impl, options) in zip(args.impls, specs):
        c = get_config("small")
        c.data.path = args.data
        c.data.seq_len = args.seq_len
        c.data.batch_size = args.batch
        c.model.num_layers = args.layers
        c.model.pos_shape = (args.seq_len // c.attention.stride, c.attention.stride)
        c.model.dtype = args.dtype
        c.model.dropout = 0.0
        c.attention.impl = impl
        c.attention.update(options)
        c.optim.warmup_steps = 2
        c.optim.learning_rate = 1e-3
        c.train.num_steps = args.steps
        c.train.log_every = 1
        c.train.eval_every = 0
        c.train.eval_max_batches = 2
        c.train.checkpoint_every = 10_000
        c.train.async_checkpoint = False
        with tempfile.TemporaryDirectory() as workdir:
            start = time.time()
            summary = train_and_evaluate(c, workdir)
            records = read_metrics(workdir, "train")
        runs[spec] = {
            "losses": [r["loss"] for r in records],
            "grad_norms": [r["grad_norm"] for r in records],
            "eval_bits_per_byte": summary["eval"]["bits_per_byte"],
            "seconds": time.time() - start,
        }
    base = runs[args.impls[0]]["losses"]
    width = max(14, *(len(i) for i in args.impls))
    rows = [f"{'step':>4} " + " ".join(f"{i:>{width}}" for i in args.impls) + f" {'max rel diff':>13}"]
    worst = 0.0
    for s in range(len(base)):
        vals = [runs[i]["losses"][s] for i in args.impls]
        rel = max(abs(v - base[s]) / abs(base[s]) for v in vals)
        worst = max(worst, rel)
        rows.append(f"{s + 1:>4} " + " ".join(f"{v:>{width}.6f}" for v in vals) + f" {rel:>13.2e}")
    result = {"device": jax.devices()[0].device_kind, "args": vars(args), "runs": runs, "max_rel_loss_diff": worst}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n".join(rows))
    print(f"device {result['device']}: max relative loss difference {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
