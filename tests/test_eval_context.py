"""The longer-context evaluation: overlapping windows that score every byte once."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_lm.data import ByteSource, DataError, eval_batches


def scored_positions(source: ByteSource, min_context: int, batch_size: int = 4):
    """(buffer offset, context length) of every scored byte, from the batches themselves."""
    cover = source.eval_cover(min_context)
    out = []
    row = 0
    for tokens, weights in eval_batches(
        source, batch_size, min_context=min_context, process_index=0, process_count=1
    ):
        for r in range(tokens.shape[0]):
            if row < cover.starts.size:
                start = int(cover.starts[row])
                for p in np.nonzero(weights[r])[0]:
                    # The window's bytes must be the buffer's bytes at those offsets.
                    assert tokens[r, p] == source.buffer[start + p]
                    out.append((start + int(p), int(p)))
            row += 1
    return out


@pytest.mark.parametrize("min_context", [0, 3, 7, 9])
def test_every_byte_is_scored_exactly_once(min_context):
    rng = np.random.default_rng(0)
    buffer = rng.integers(0, 256, 103, dtype=np.uint8)
    source = ByteSource(buffer, 10, segment_lengths=[50, 3, 50])
    scored = scored_positions(source, min_context)
    offsets = sorted(o for o, _ in scored)
    assert offsets == list(range(103))


@pytest.mark.parametrize("min_context", [3, 7, 9])
def test_bytes_after_the_first_window_see_at_least_min_context(min_context):
    buffer = np.arange(200, dtype=np.uint8)
    source = ByteSource(buffer, 10, segment_lengths=[120, 80])
    for offset, context in scored_positions(source, min_context):
        within_segment = offset if offset < 120 else offset - 120
        if within_segment >= 10:  # past the first window of its segment
            assert context >= min_context, (offset, context)
        else:
            assert context == within_segment  # the first window scores from its start


def test_more_context_means_more_windows():
    source = ByteSource(np.zeros(1000, dtype=np.uint8), 100)
    assert source.eval_cover(0).starts.size == 10
    # Each further window adds 100 - 75 = 25 new bytes: 1 + ceil(900 / 25) windows.
    assert source.eval_cover(75).starts.size == 1 + 36


def test_min_context_must_leave_room_to_predict():
    source = ByteSource(np.zeros(100, dtype=np.uint8), 10)
    with pytest.raises(DataError, match="min_context=10 must be"):
        source.eval_cover(10)
