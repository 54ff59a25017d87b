"""Small utilities shared by tests: configs pointed at the real sample data, subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


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
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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
