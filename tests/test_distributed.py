"""Multi-process start-up arguments (the runs themselves: tests/test_multihost.py)."""

from __future__ import annotations

import jax
import pytest

from sparse_lm import distributed


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


def test_explicit_arguments_turn_cluster_detection_off(calls, monkeypatch):
    """Inside a SLURM allocation, JAX's detection would fill in SLURM_LOCALID as the
    only local device even with the three values given: one task per node of 8 GPUs
    would train on one. Explicit mode uses every device the process sees."""
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert distributed.initialize("node001:12355", 4, 2)
    assert calls == [dict(coordinator_address="node001:12355", num_processes=4, process_id=2,
                          cluster_detection_method="deactivate")]


def test_auto_mode_leaves_detection_to_jax_and_no_arguments_is_one_process(calls):
    assert distributed.initialize(auto=True) and calls == [{}]
    assert not distributed.initialize() and len(calls) == 1


@pytest.mark.parametrize("args,problem", [
    (("node:1", 0, 0), "needs --num_processes"),
    (("node:1", 2, 2), "must be below --num_processes=2"),
    (("node", 2, 0), "needs a port"),
])
def test_incomplete_explicit_arguments_are_refused(calls, args, problem):
    with pytest.raises(distributed.DistributedSetupError, match=problem):
        distributed.initialize(*args)
    assert calls == []
