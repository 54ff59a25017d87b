"""Training and evaluation batches from a ``ByteSource``, sharded across hosts.

Training order is a function of ``(seed, epoch)`` only: every host computes the same
global batch of example indices and keeps its own contiguous block of rows, so hosts
need no communication and the rows of one step are disjoint and cover the global batch.
The state is the global position (epoch, offset into that epoch's permutation), so a
run resumes exactly, even on a different number of hosts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from sparse_lm.data.errors import DataError
from sparse_lm.data.source import ByteSource

_STATE_VERSION = 1
# Distinct stream tags so the permutation and the flips are independent draws.
_PERMUTATION_STREAM = 0
_FLIP_STREAM = 1


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    return int(process_index), int(process_count)


def _per_host(batch_size: int, process_count: int, what: str) -> int:
    if batch_size < process_count or batch_size % process_count:
        raise DataError(
            f"The {what} batch size {batch_size} must be a positive multiple of the number of "
            f"hosts ({process_count}) so that every host gets the same number of rows; change it."
        )
    return batch_size // process_count


class TrainIterator:
    """Endless shuffled batches: ``int32 [global_batch_size // process_count, seq_len]``.

    Each epoch visits every example exactly once, in a permutation drawn from
    ``(seed, epoch)``. A global batch that runs past the end of an epoch continues into
    the next epoch's permutation, so no example is dropped or repeated.
    With ``flip``, each example is mirrored left-right (as an image of ``image_shape``)
    with probability 1/2, decided by ``(seed, epoch, example index)``.
    """

    def __init__(
        self,
        source: ByteSource,
        global_batch_size: int,
        seed: int,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        shuffle: bool = True,
        flip: bool = False,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        if len(source) == 0:
            raise DataError(f"{source!r} holds no example of seq_len={source.seq_len}; nothing to train on.")
        self.source = source
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.process_index, self.process_count = _process_layout(process_index, process_count)
        self.local_batch_size = _per_host(self.global_batch_size, self.process_count, "training")
        self.shuffle = bool(shuffle)
        self.flip = bool(flip)
        if self.flip:
            shape = image_shape or source.meta.get("image_shape")
            if shape is None or len(shape) != 3 or int(np.prod(shape)) != source.seq_len:
                raise DataError(
                    f"flip=True needs image_shape (height, width, channels) whose product is "
                    f"seq_len={source.seq_len}, got {shape}; pass image_shape or turn flip off."
                )
            self.image_shape: tuple[int, ...] | None = tuple(int(s) for s in shape)
        else:
            self.image_shape = None
        self.epoch = 0
        self.position = 0  # examples of the current epoch already handed out (all hosts)
        self._cached_epoch: int | None = None
        self._order: np.ndarray | None = None
        self._flips: np.ndarray | None = None

    @property
    def num_examples(self) -> int:
        return len(self.source)

    def _epoch_tables(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._cached_epoch != epoch:
            n = self.num_examples
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, _PERMUTATION_STREAM])
                self._order = rng.permutation(n)
            else:
                self._order = np.arange(n)
            # Flips are indexed by example, not by position, so they do not depend on the
            # batch size or on how the epoch was split between hosts.
            self._flips = (
                np.random.default_rng([self.seed, epoch, _FLIP_STREAM]).random(n) < 0.5 if self.flip else None
            )
            self._cached_epoch = epoch
        assert self._order is not None
        return self._order, self._flips

    def _global_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Examples of the next global batch and their flip bits; advances the state."""
        indices, flips = [], []
        need = self.global_batch_size
        while need:
            order, flip_table = self._epoch_tables(self.epoch)
            take = min(need, self.num_examples - self.position)
            chunk = order[self.position : self.position + take]
            indices.append(chunk)
            flips.append(flip_table[chunk] if flip_table is not None else np.zeros(take, bool))
            self.position += take
            need -= take
            if self.position == self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(indices), np.concatenate(flips)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> np.ndarray:
        indices, flips = self._global_indices()
        lo = self.process_index * self.local_batch_size
        mine = slice(lo, lo + self.local_batch_size)
        batch = self.source.get_batch(indices[mine])
        if self.flip and flips[mine].any():
            assert self.image_shape is not None
            images = batch.reshape(-1, *self.image_shape)
            rows = flips[mine]
            images[rows] = images[rows][:, :, ::-1]  # reverse the column axis
            batch = images.reshape(len(batch), -1)
        return batch.astype(np.int32)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position; independent of the process layout."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_examples": self.num_examples,
            "shuffle": self.shuffle,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes from ``get_state()``; refuses a state taken on different data."""
        if int(state.get("num_examples", -1)) != self.num_examples:
            raise DataError(
                f"The saved data position was taken on a split of {state.get('num_examples')} "
                f"examples, but this one has {self.num_examples} (different data, seq_len or "
                f"split fractions). Restore with the same data settings, or start a new run."
            )
        position = int(state["position"])
        if not 0 <= position < self.num_examples:
            raise DataError(f"Saved data position {position} is outside 0..{self.num_examples - 1}.")
        self.seed = int(state.get("seed", self.seed))
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.position = position
        self._cached_epoch = None


def eval_batches(
    source: ByteSource,
    batch_size: int,
    *,
    min_context: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(tokens int32 [b, seq_len], weights float32 [b, seq_len])`` covering every byte once.

    ``batch_size`` is global; ``b = batch_size // process_count``. Global batch ``k``
    holds cover rows ``k * batch_size ...``, each host its contiguous block of them.
    Rows past the end, padding after a segment's tail, and (with ``min_context``) the
    context-only prefix of overlapping windows have weight 0, so the sum of all weights
    over all hosts is ``source.num_bytes``. Every host yields the same number of
    batches, which collective evaluation steps require.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    local = _per_host(int(batch_size), process_count, "evaluation")
    rows = source.eval_cover(min_context).starts.size
    num_batches = -(-rows // batch_size)
    positions = np.arange(source.seq_len)
    for k in range(num_batches):
        tokens = np.zeros((local, source.seq_len), dtype=np.int32)
        weights = np.zeros((local, source.seq_len), dtype=np.float32)
        first = k * batch_size + process_index * local
        for j in range(local):
            if first + j < rows:
                row, length, scored_from = source.eval_row(first + j, min_context)
                tokens[j] = row
                weights[j] = (positions >= scored_from) & (positions < length)
        yield tokens, weights
