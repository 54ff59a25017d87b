"""Bits per byte over a whole split, and evaluation of a saved checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections

from sparse_lm import data as data_lib
from sparse_lm import sharding
from sparse_lm.checkpoint import restore_for_inference
from sparse_lm.config import ConfigError
from sparse_lm.steps import ModelFns, make_eval_step


class Evaluator:
    """Computes bits per byte of a model's parameters over a split, on a mesh."""

    def __init__(self, fns: ModelFns, config: ml_collections.ConfigDict, mesh):
        self.config, self.mesh = config, mesh
        dp = sharding.data_parallel_size(mesh)
        if config.data.eval_batch_size % dp:
            # Otherwise JAX fails mid-evaluation, with a traceback, placing the first batch.
            raise ConfigError(
                f"config.data.eval_batch_size={config.data.eval_batch_size} cannot be shared "
                f"evenly by {dp} data-parallel devices; make it a multiple of {dp}."
            )
        batch_sh = sharding.batch_sharding(mesh)
        self._step = jax.jit(make_eval_step(fns), in_shardings=(None, batch_sh, batch_sh))

    def __call__(
        self, params: Any, source: Any, *, max_batches: int = 0, min_context: int = 0
    ) -> dict:
        """Log2 loss averaged over every predicted byte of ``source`` (or its first batches).

        Every byte of the split is predicted once, each window from its own start;
        padding carries weight 0. With ``min_context`` windows overlap so that every
        byte after the first window of a segment is predicted from at least that many
        bytes (see ``ByteSource.eval_cover``). Sums are accumulated on the host in float64 so that
        a 5 MB split loses no precision.
        """
        nats = 0.0
        count = 0.0
        batches = data_lib.eval_batches(
            source, self.config.data.eval_batch_size, min_context=min_context
        )
        for i, (tokens, weights) in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            out = self._step(
                params,
                sharding.global_batch(tokens, self.mesh),
                sharding.global_batch(weights, self.mesh),
            )
            out = jax.device_get(out)
            nats += float(out["nats"])
            count += float(out["bytes"])
        if count == 0:
            raise data_lib.DataError("the evaluation split holds no bytes to predict.")
        return {
            "bits_per_byte": nats / count / math.log(2.0),
            "loss": nats / count,
            "num_bytes": int(count),
        }


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    split: str = "valid",
    step: int | None = None,
    max_batches: int = 0,
    min_context: int = 0,
) -> dict:
    """Restores a checkpoint read-only, evaluates ``split``, writes eval_<split>_<step>.json
    (``eval_<split>_<step>_ctx<m>.json`` with ``min_context=m``, and ``_b<n>`` added when
    only the first ``max_batches=n`` batches are scored)."""
    fns, params, step, mesh = restore_for_inference(config, workdir, step=step)
    source = data_lib.load_split(config.data, split)
    with jax.set_mesh(mesh):
        result = Evaluator(fns, config, mesh)(
            params, source, max_batches=max_batches, min_context=min_context
        )
    result = {"split": split, "step": step, "min_context": min_context,
              "max_batches": max_batches, **result}
    if jax.process_index() == 0:
        # A partial evaluation never takes the whole split's file name.
        suffix = (f"_ctx{min_context}" if min_context else "") + (f"_b{max_batches}" if max_batches else "")
        out = Path(workdir) / f"eval_{split}_{step}{suffix}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        result["path"] = str(out)
    return result
