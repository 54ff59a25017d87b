"""What the three entry points share: flags, multi-host start-up and error reporting.

User mistakes (a bad config value, a missing data path, an incompatible checkpoint)
end with one paragraph that names the problem and the fix, not a traceback.
"""

from __future__ import annotations

import os
import re
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config mistakes reported as one paragraph (exit code 2).

    Pass as ``app.run(main, flags_parser=cli.parse_flags)``. ml_collections raises a bare
    ``AttributeError: "'name'"`` (a traceback) for an override of a field that does not
    exist, and ``OSError`` for a config file it cannot load; absl's own parse errors
    already are one line but exit with 1 and a second line of help.
    """
    try:
        remaining = FLAGS(argv)
        # Warnings and errors only from absl logging unless --verbosity is given: Orbax
        # logs every checkpoint step at INFO (150 of a quickstart run's 174 console
        # lines). absl.app would raise an unset verbosity to INFO after this parser.
        if "verbosity" in FLAGS and FLAGS["verbosity"].using_default_value:
            FLAGS.verbosity = -1
        if "config" in FLAGS:
            # ml_collections defers a config file that fails to load to the first
            # attribute access (its placeholder raises OSError): surface it here, before
            # any work starts.
            FLAGS.config.keys  # noqa: B018
        return remaining
    except flags.Error as e:
        _paragraph(f"error: {_flag_error_text(e)}. Run with --helpfull to list the flags.")
    except (AttributeError, KeyError) as e:
        _paragraph(f"error: {_unknown_field_message(argv, e)}")
    except (OSError, ImportError, SyntaxError, ValueError, TypeError) as e:
        # The config file itself failed to load (missing file, bad variant, bad code).
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        _paragraph(f"error: cannot load the config ({type(e).__name__}: {text}). Check --config.")
    sys.exit(2)


def _flag_error_text(error: BaseException) -> str:
    """absl's message, with an embedded traceback (a config file that raised) cut to its
    first line and its final exception line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        lines = [lines[0], lines[-1]]
    return " ".join(lines).rstrip(".")


def _unknown_field_message(argv: list[str], error: BaseException) -> str:
    """Names the --config.* override that refers to a missing field, and its siblings."""
    # ml_collections' texts look like "'name'" or "'name'\nDid you mean ...": the first
    # quoted word is the missing field.
    found = re.search(r"'([A-Za-z0-9_]+)", str(error))
    missing = found.group(1) if found else str(error)
    hint = re.search(r'Did you mean "([A-Za-z0-9_]+)"', str(error))
    overrides = [
        a.split("=", 1)[0].lstrip("-") for a in argv[1:] if a.startswith("--config.")
    ]
    culprit = next((o for o in overrides if missing in o.split(".")[1:]), None)
    if culprit is None:
        return f"unknown config field {missing!r} in a --config.* override ({_first(overrides)})."
    parts = culprit.split(".")[1:]
    parent = parts[: parts.index(missing)]
    message = f"unknown config field --{culprit}: the config has no field {missing!r}"
    message += f" under config.{'.'.join(parent)}." if parent else "."
    from sparse_lm.config import REMOVED_FIELDS, base_config

    why = REMOVED_FIELDS.get(".".join(parent), {}).get(missing)
    if why:  # a field that once existed: say so, not "check the spelling"
        return f"{message} config.{'.'.join(parent)}.{missing} was {why}; drop the override."
    try:
        node = base_config()
        for p in parent:
            node = node[p]
        message += f" Fields there: {', '.join(sorted(node.keys()))}."
    except (KeyError, AttributeError, TypeError):
        pass  # a parent that is itself unknown: the name alone has to do
    if hint:
        message += f" Did you mean {hint.group(1)!r}?"
    return message + " Fields are documented in sparse_lm/config.py; check the spelling."


def _first(items: list[str]) -> str:
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "") if items else "none given"


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
    # Paths are wrapped only at spaces, never at their hyphens, so they can be copied.
    print(
        textwrap.fill(text, width=100, break_on_hyphens=False, break_long_words=False),
        file=sys.stderr, flush=True,
    )
