"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The Mosaic GPU interpreter runs each warpgroup as its own XLA computation on its own
# thread, and a warpgroup at a barrier blocks inside a callback. XLA CPU's
# concurrency-optimized scheduler runs such callbacks on its intra-op pool, which has as
# many threads as there are cores: on a two-core machine (CI's), warpgroups blocked there
# can leave none for the warpgroup they wait on. The query-major dK/dV+dq kernel under
# jit deadlocked so; with the sequential schedule each callback runs on its own
# computation's thread. Set before any test initializes a JAX backend.
_SEQUENTIAL_CPU = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# The tests run in this process are bound by XLA's compilations, not by running what
# they compile (small interpreted kernels, small models): LLVM's optimization level 0
# compiles faster than the default for the same results up to float rounding order
# (tests/test_pallas_gpu.py::test_column_backward_*: 32 -> 24 s; the Mosaic GPU, decode
# and TPU-interpreter tests 249 -> 227 s, on two cores). Subprocesses the tests start
# get the same flags (tests/helpers.py's xla_flags): the resume tests compare a run in
# this process with runs in subprocesses bit for bit.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
for _flag in (_SEQUENTIAL_CPU, _FAST_COMPILE):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()


# One persistent compilation cache for the whole test run: pytest's process, its xdist
# workers and every subprocess a test starts (they inherit the environment). The suite
# is bound by XLA compilations on CPU, and many are the same program compiled again:
# an eager ``pallas_call`` jits a new function on every call, so the interpreted kernels
# every kernel test checks against recompile in each test, and the entry points'
# subprocesses compile the same smoke step. Through the cache each compiles once
# (tests/test_pallas_gpu.py::test_column_backward_*: 50 -> 34 s alone). The same
# program gives the same executable, so no result changes. Set before any test imports
# JAX (it reads these variables then); the process that made the folder removes it.
# A folder given in $JAX_COMPILATION_CACHE_DIR is used as it is and kept.
_OWN_COMPILE_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _OWN_COMPILE_CACHE = tempfile.mkdtemp(prefix="sparse_lm_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_COMPILE_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    if _OWN_COMPILE_CACHE is not None:
        shutil.rmtree(_OWN_COMPILE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real sample data: ``$SPARSE_LM_SHARED_DATA`` or ``<repo>/../shared/data``.

    Missing, the test is skipped, except under ``SPARSE_LM_REQUIRE_SHARED_DATA=1`` (CI),
    where a missing folder must fail rather than silently skip the real-data tests.
    """
    env = os.environ.get("SPARSE_LM_SHARED_DATA")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        message = (
            f"real sample data not found at {path}; put a copy of shared/ beside the repository "
            f"or set SPARSE_LM_SHARED_DATA"
        )
        if os.environ.get("SPARSE_LM_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + " (required because SPARSE_LM_REQUIRE_SHARED_DATA=1)")
        pytest.skip(message)
    return path
