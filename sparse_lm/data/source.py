"""``ByteSource``: one split of a data set as fixed-length byte examples.

A split is held as one flat ``uint8`` buffer divided into *segments*: a whole corpus
(enwik8, text) is one segment, every CIFAR image is one, every audio file is one.
Training examples are the non-overlapping windows of ``seq_len`` bytes that fit inside a
segment; a window never crosses a segment boundary (no clip mixes two recordings).
The tail of a segment shorter than ``seq_len`` is not a training example, but it is
still part of the split: ``num_bytes`` counts it and the evaluation rows
(``num_eval_rows`` / ``eval_row``) cover it, padded, so bits per byte is averaged over
every byte of the split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparse_lm.data.errors import DataError


class ByteSource:
    """Fixed-length ``uint8`` examples cut from the segments of one split."""

    def __init__(
        self,
        buffer: np.ndarray,
        seq_len: int,
        *,
        segment_lengths: Sequence[int] | np.ndarray | None = None,
        name: str = "data",
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Wraps ``buffer`` (1-D ``uint8``, may be a memmap) without copying it.

        ``segment_lengths`` must sum to ``len(buffer)``; ``None`` means one segment.
        ``meta`` carries source-specific extras (CIFAR labels, skipped audio files...).
        """
        buffer = np.asarray(buffer)
        if buffer.dtype != np.uint8 or buffer.ndim != 1:
            raise TypeError(f"buffer must be 1-D uint8, got {buffer.dtype} {buffer.shape}")
        if int(seq_len) < 1:
            raise DataError(f"seq_len must be a positive integer, got {seq_len}; set data.seq_len.")
        self.buffer = buffer
        self.seq_len = int(seq_len)
        self.name = name
        self.meta: dict[str, Any] = dict(meta or {})
        lengths = (
            np.array([buffer.size], dtype=np.int64)
            if segment_lengths is None
            else np.asarray(segment_lengths, dtype=np.int64)
        )
        if lengths.sum() != buffer.size or (lengths < 0).any():
            raise ValueError("segment_lengths must be non-negative and sum to len(buffer)")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.num_bytes = int(buffer.size)
        # Training windows: every full window of each segment, in buffer order.
        full = lengths // self.seq_len
        self._starts = _window_starts(starts, full, self.seq_len)
        self._seg_starts, self._seg_lengths = starts, lengths
        self._eval_cover: dict[int, EvalCover] = {}

    def __len__(self) -> int:
        return int(self._starts.size)

    def __getitem__(self, i: int) -> np.ndarray:
        """Example ``i`` as a fresh ``uint8 [seq_len]`` array."""
        start = int(self._starts[i])
        return np.array(self.buffer[start : start + self.seq_len], dtype=np.uint8)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Examples ``indices`` stacked as ``uint8 [len(indices), seq_len]``."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"example index out of range for {len(self)} examples")
        offsets = self._starts[idx][:, None] + np.arange(self.seq_len)[None, :]
        return np.asarray(self.buffer[offsets], dtype=np.uint8)

    def eval_cover(self, min_context: int = 0) -> "EvalCover":
        """Windows that predict every byte of the split exactly once.

        With ``min_context=0`` the windows tile each segment (the last one padded), and
        each byte is predicted from the start of its window. With ``min_context=m`` the
        windows of a segment overlap by ``m`` bytes and each window after the first
        predicts only its last ``seq_len - m`` positions, so every byte past the first
        window is predicted with at least ``m`` bytes of context (the paper's longer-
        context evaluation). Windows never cross a segment boundary.
        """
        m = int(min_context)
        if not 0 <= m < self.seq_len:
            raise DataError(
                f"min_context={m} must be at least 0 and smaller than the context of "
                f"{self.seq_len} bytes."
            )
        if m not in self._eval_cover:
            self._eval_cover[m] = _cover(self._seg_starts, self._seg_lengths, self.seq_len, m)
        return self._eval_cover[m]

    @property
    def num_eval_rows(self) -> int:
        """Rows needed to cover every byte once (full windows and padded tails)."""
        return int(self.eval_cover(0).starts.size)

    def eval_row(self, i: int, min_context: int = 0) -> tuple[np.ndarray, int, int]:
        """Row ``i`` of the evaluation cover: ``(uint8 [seq_len] zero-padded, valid length,
        first predicted position)``; positions in [first, valid length) are scored."""
        cover = self.eval_cover(min_context)
        start, length = int(cover.starts[i]), int(cover.lengths[i])
        row = np.zeros(self.seq_len, dtype=np.uint8)
        row[:length] = self.buffer[start : start + length]
        return row, length, int(cover.first_scored[i])

    def __repr__(self) -> str:
        return (
            f"ByteSource({self.name!r}, examples={len(self)}, seq_len={self.seq_len}, "
            f"num_bytes={self.num_bytes})"
        )


@dataclasses.dataclass(frozen=True)
class EvalCover:
    starts: np.ndarray  # int64 [rows]: buffer offset of each window
    lengths: np.ndarray  # int64 [rows]: bytes of the window inside its segment
    first_scored: np.ndarray  # int64 [rows]: first position whose prediction counts


def _cover(seg_starts: np.ndarray, seg_lengths: np.ndarray, seq_len: int, m: int) -> EvalCover:
    stride = seq_len - m
    # Windows per segment: the first covers seq_len bytes, each further one stride more.
    rows = 1 + -(-np.maximum(seg_lengths - seq_len, 0) // stride)
    rows = np.where(seg_lengths > 0, rows, 0)
    starts = _window_starts(seg_starts, rows, stride)
    ends = np.repeat(seg_starts + seg_lengths, rows)
    lengths = np.minimum(ends - starts, seq_len)
    first = np.repeat(np.cumsum(rows) - rows, rows)
    first_scored = np.where(np.arange(starts.size) == first, 0, m)
    return EvalCover(starts, lengths, first_scored.astype(np.int64))


def _window_starts(seg_starts: np.ndarray, counts: np.ndarray, seq_len: int) -> np.ndarray:
    """Start offsets of ``counts[k]`` windows ``seq_len`` apart from each ``seg_starts[k]``."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(seg_starts, counts)
    # Position of each window within its segment: 0, 1, ... restarting per segment.
    begin = np.repeat(np.cumsum(counts) - counts, counts)
    within = np.arange(total, dtype=np.int64) - begin
    return first + within * seq_len


def require_examples(source: ByteSource, split: str, hint: str) -> ByteSource:
    """Raises a ``DataError`` when ``source`` holds no full example of ``seq_len`` bytes."""
    if len(source) == 0:
        raise DataError(
            f"The {split} split of {source.name} holds {source.num_bytes:,} bytes, fewer than "
            f"one sequence of seq_len={source.seq_len:,} bytes (per segment), so it has no "
            f"examples. {hint}"
        )
    return source
