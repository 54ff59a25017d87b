"""Small utilities shared by tests: configs pointed at the real sample data, subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with ``devices`` virtual CPU devices: this process's own
    flags (tests/conftest.py's, so that a run in a subprocess computes bit for bit what
    the same run in the test process does) plus the device count."""
    own = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*own, f"--xla_force_host_platform_device_count={devices}"])


def smoke_config(name: str, shared_data: Path, **overrides):
    """``configs/<name>.py:smoke`` with its data path set to the real sample in shared_data."""
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config("smoke")
    paths = {
        "enwik8": shared_data / "text" / "enwik8_first_1MB.xml",
        "cifar10": shared_data / "cifar10-sample" / "cifar-10-batches-bin",
        "audio": shared_data / "audio" / "spoken_digits",
    }
    config.data.path = str(paths[name])
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def run_python(code: str, *, devices: int = 1, timeout: int = 600, env: dict | None = None) -> dict:
    """Runs ``code`` in a fresh Python with ``devices`` virtual CPU devices.

    The code must print one JSON object as its last line; that object is returned.
    A fresh process is needed because the device count is fixed when JAX starts.
    """
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = xla_flags(devices)
    full_env["PYTHONPATH"] = str(REPO_ROOT)
    full_env["JAX_PLATFORMS"] = "cpu"
    if env:
        full_env.update(env)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO_ROOT,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({result.returncode}):\nSTDOUT:\n{result.stdout[-3000:]}\n"
            f"STDERR:\n{result.stderr[-5000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def script_env(devices: int = 1, compile_cache: str | Path | None = None) -> dict:
    """The environment for running an entry point in ``scripts/`` on ``devices`` CPU devices.

    ``compile_cache``: a folder for JAX's persistent compilation cache (see
    ``compilation_cache``), so that processes compiling the same program compile it once.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # so a test can read progress while the script runs
    if compile_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(compile_cache)
    return env


@contextlib.contextmanager
def compilation_cache(folder: str | Path):
    """JAX's persistent compilation cache in ``folder`` for this process, inside the block.

    Each run of ``train_and_evaluate`` jits a new step function, so a second run of the
    same config in one process compiles it again; through the cache it loads the first
    run's executable instead (the same program: the same results, bit for bit). Only
    compilations longer than ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` are stored
    (tests/conftest.py sets 0.1 s). Subprocesses given the same folder
    (``script_env(compile_cache=...)``) share the entries. (tests/conftest.py also gives
    the whole run one cache; a block with its own folder starts from an empty one.)
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(folder))
    cache.reset_cache()  # JAX opens the cache once per process: make it see the folder
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        cache.reset_cache()


def script_command(script: str, config: str, workdir: str | Path, *flags: str) -> list[str]:
    """``python scripts/<script>.py --config <config> --workdir <workdir> <flags>``."""
    return [
        sys.executable, str(REPO_ROOT / "scripts" / f"{script}.py"),
        "--config", str(REPO_ROOT / config), "--workdir", str(workdir), *flags,
    ]


def run_script(
    command: list[str], *, timeout: int = 300, devices: int = 1, compile_cache: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """Runs an entry point to completion; returns the CompletedProcess (any exit code)."""
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout,
        env=script_env(devices, compile_cache), cwd=REPO_ROOT,
    )


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """Steps whose checkpoint folder Orbax has finalized (named by the bare step number)."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def tree_snapshot(folder: str | Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder``: relative path -> (size, mtime in ns)."""
    root = Path(folder)
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def spec_id(spec, layer: int) -> str:
    """A pytest id for a (PatternSpec, layer) case, e.g. ``fixed-merged-L0-distinct``."""
    return f"{spec.name}-{spec.combine}-L{layer}{'-distinct' if spec.distinct_summaries else ''}"


def attention_spec_cases():
    """(spec, layer) pairs: every pattern and combine mode (interleaved layers 0 and 1
    differ), each fixed one also with distinct summaries; and their pytest ids.

    A function so that importing this module does not import JAX.
    """
    from sparse_lm.attention import PatternSpec

    cases = [
        (PatternSpec("dense"), 0),
        (PatternSpec("local", 16), 0),
        (PatternSpec("strided", 16, combine="merged"), 0),
        (PatternSpec("strided", 16, combine="interleaved"), 0),
        (PatternSpec("strided", 16, combine="interleaved"), 1),
        (PatternSpec("strided", 16, combine="multihead"), 0),
        (PatternSpec("fixed", 16, 4, combine="merged"), 0),
        (PatternSpec("fixed", 16, 4, combine="interleaved"), 0),
        (PatternSpec("fixed", 16, 4, combine="interleaved"), 1),
        (PatternSpec("fixed", 16, 4, combine="multihead"), 0),
        (PatternSpec("fixed", 16, 4, combine="merged", distinct_summaries=True), 0),
        (PatternSpec("fixed", 16, 4, combine="interleaved", distinct_summaries=True), 1),
        (PatternSpec("fixed", 16, 4, combine="multihead", distinct_summaries=True), 0),
    ]
    return cases, [spec_id(s, layer) for s, layer in cases]


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64 (x and ref: arrays of any float dtype)."""
    import jax.numpy as jnp
    import numpy as np

    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
