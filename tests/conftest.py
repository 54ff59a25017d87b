"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
