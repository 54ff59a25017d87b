"""What the three entry points share: flags, multi-host start-up and error reporting.

User mistakes (a bad config value, a missing data path, an incompatible checkpoint)
end with one paragraph that names the problem and the fix, not a traceback.
"""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Callable

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_common_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/enwik8.py or configs/enwik8.py:small.",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, samples.")
    flags.DEFINE_string(
        "coordinator_address", os.environ.get("SPARSE_LM_COORDINATOR", ""),
        "Multi-host: host:port of process 0 (else auto-detected where JAX can).",
    )
    flags.DEFINE_integer(
        "num_processes", int(os.environ.get("SPARSE_LM_NUM_PROCESSES", "0")),
        "Multi-host: number of processes (with --coordinator_address).",
    )
    flags.DEFINE_integer(
        "process_id", int(os.environ.get("SPARSE_LM_PROCESS_ID", "-1")),
        "Multi-host: this process's index (with --coordinator_address).",
    )
    flags.DEFINE_bool(
        "distributed", False,
        "Call jax.distributed.initialize() with auto-detection (SLURM, TPU pods, "
        "Kubernetes with JAX's cluster plugins).",
    )
    flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """Starts JAX's multi-process runtime when asked; a no-op for one process."""
    from sparse_lm import distributed

    try:
        distributed.initialize(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
            auto=FLAGS.distributed,
        )
    except distributed.DistributedSetupError as e:
        raise UsageError(str(e)) from None


class UsageError(ValueError):
    """A command-line mistake."""


def user_errors() -> tuple[type[BaseException], ...]:
    from sparse_lm.attention import PatternError
    from sparse_lm.checkpoint import CheckpointError
    from sparse_lm.config import ConfigError
    from sparse_lm.data import DataError
    from sparse_lm.sharding import MeshError
    from sparse_lm.train import WorkdirError

    return (UsageError, PatternError, CheckpointError, ConfigError, DataError, MeshError, WorkdirError)


def run_reporting_errors(fn: Callable[[], int | None]) -> int:
    """Runs ``fn``; known user errors print one wrapped paragraph and exit with code 2."""
    from sparse_lm.train import TrainingHalted

    try:
        return fn() or 0
    except user_errors() as e:
        _paragraph(f"error: {e}")
        return 2
    except TrainingHalted as e:
        _paragraph(f"training halted: {e}")
        return 1


def _paragraph(text: str) -> None:
    print(textwrap.fill(text, width=100), file=sys.stderr, flush=True)
