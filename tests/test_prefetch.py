"""Device prefetch: the same batches and data positions as reading in the loop, resumable."""

from __future__ import annotations

import threading
import time

import jax
import ml_collections
import numpy as np
import pytest

from sparse_lm import sharding
from sparse_lm.data import ByteSource, DataError, TrainIterator
from sparse_lm.prefetch import DevicePrefetcher

SEQ_LEN, BATCH = 16, 4


def _iterator(seed: int = 3) -> TrainIterator:
    # 50 examples: a batch of 4 runs past an epoch's end every 12.5 batches, so the
    # stream below crosses epochs (the state's epoch changes, not only its offset).
    data = np.random.default_rng(0).integers(0, 256, 50 * SEQ_LEN, dtype=np.uint8)
    return TrainIterator(ByteSource(data, SEQ_LEN), BATCH, seed, process_index=0, process_count=1)


def _mesh():
    return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def _reference(n: int, start_state: dict | None = None) -> list[tuple[np.ndarray, dict]]:
    it = _iterator()
    if start_state is not None:
        it.set_state(start_state)
    out = []
    for _ in range(n):
        batch = next(it)
        out.append((batch, it.get_state()))
    return out


def test_same_batches_and_states_as_without_prefetch_placed_on_device():
    mesh = _mesh()
    expected = _reference(30)
    with DevicePrefetcher(_iterator(), lambda b: sharding.global_batch(b, mesh), size=3) as pf:
        for want_batch, want_state in expected:
            batch, state = next(pf)
            assert isinstance(batch, jax.Array)
            assert batch.sharding == sharding.batch_sharding(mesh)
            np.testing.assert_array_equal(np.asarray(batch), want_batch)
            assert state == want_state
            assert pf.get_state() == want_state
    assert {s["epoch"] for _, s in expected} == {0, 1, 2}


def test_state_is_the_consumers_position_while_the_producer_reads_ahead():
    it = _iterator()
    start = it.get_state()
    pf = DevicePrefetcher(it, lambda b: b, size=4)
    try:
        assert pf.get_state() == start  # nothing handed out yet
        _, state = next(pf)
        deadline = time.monotonic() + 10
        # The producer fills the queue (4) and holds one more batch it cannot put.
        while it.get_state()["position"] < (1 + 4) * BATCH and time.monotonic() < deadline:
            time.sleep(0.01)
        assert it.get_state()["position"] >= (1 + 4) * BATCH, "no batch was read ahead"
        assert state["position"] == pf.get_state()["position"] == BATCH
    finally:
        pf.close()


def test_resume_from_a_prefetched_state_continues_the_uninterrupted_stream():
    straight = _reference(20)
    with DevicePrefetcher(_iterator(), lambda b: b, size=3) as pf:
        for _ in range(7):
            _, saved = next(pf)
        # The producer is ahead of step 7 here; the checkpoint gets the consumer's state.
    resumed_it = _iterator()
    resumed_it.set_state(saved)
    with DevicePrefetcher(resumed_it, lambda b: b, size=3) as pf:
        rest = [next(pf) for _ in range(13)]
    for (batch, state), (want_batch, want_state) in zip(rest, straight[7:]):
        np.testing.assert_array_equal(batch, want_batch)
        assert state == want_state


class _FailsAt:
    """Yields batches 0, 1, ... and raises DataError when asked for batch ``n``."""

    def __init__(self, n: int):
        self.n, self.i = n, 0

    def __next__(self):
        if self.i == self.n:
            raise DataError("bad file")
        self.i += 1
        return np.full((2, 2), self.i - 1)

    def get_state(self):
        return {"i": self.i}


def test_a_reading_error_reaches_the_consumer_after_the_good_batches():
    with DevicePrefetcher(_FailsAt(2), lambda b: b, size=2) as pf:
        assert next(pf)[1] == {"i": 1}
        assert next(pf)[1] == {"i": 2}
        with pytest.raises(DataError, match="bad file"):
            next(pf)
        with pytest.raises(StopIteration):
            next(pf)


def test_a_finite_source_ends_the_iteration():
    class Finite(_FailsAt):
        def __next__(self):
            if self.i == 3:
                raise StopIteration
            return super().__next__()

    with DevicePrefetcher(Finite(99), lambda b: b, size=2) as pf:
        assert [s["i"] for _, s in pf] == [1, 2, 3]


def test_close_stops_a_producer_blocked_on_a_full_queue():
    before = threading.active_count()
    pf = DevicePrefetcher(_iterator(), lambda b: b, size=1)
    time.sleep(0.3)  # the queue is full and the producer waits to put the next batch
    t0 = time.monotonic()
    pf.close()
    assert time.monotonic() - t0 < 5
    assert not pf._thread.is_alive()
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(pf)


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        DevicePrefetcher(_iterator(), lambda b: b, size=0)
