"""Shared pytest fixtures."""

from __future__ import annotations

import os
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
if _SEQUENTIAL_CPU not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SEQUENTIAL_CPU}".strip()


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
