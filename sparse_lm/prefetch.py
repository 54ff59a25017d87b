"""Host batches read and placed on device ahead of the step that uses them.

Reading a batch (gather from the memory-mapped source, shuffle bookkeeping, flips)
and copying it to the accelerators would otherwise happen between two train steps,
with the devices idle. ``DevicePrefetcher`` does both on a background thread, up to
``size`` batches ahead, while the current step runs.

Checkpoints must record where the *consumer* is: batches the producer has read but
the loop has not trained on are read again after a resume. So each batch comes with
the iterator's state taken right after that batch was read, which is exactly the state
to save once the step that used it is done.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class StatefulIterator(Protocol):
    """What the prefetcher needs of a data iterator (``data.TrainIterator`` fits)."""

    def __next__(self) -> Any: ...

    def get_state(self) -> dict[str, Any]: ...


_DONE = object()  # the source ended (a finite iterator)
# How often a blocked producer looks at the stop flag: short enough that close()
# returns promptly, long enough to cost nothing.
_POLL_S = 0.1


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetcher(Iterator[tuple[Any, dict[str, Any]]]):
    """Yields ``(placed_batch, state_after_this_batch)`` from ``iterator``, ``size`` ahead.

    ``place`` turns one host batch into what the step takes, e.g.
    ``lambda b: sharding.global_batch(b, mesh)``; it runs on the background thread.
    Set the iterator's state (resume) before wrapping it: from then on only the
    background thread touches it. ``get_state()`` is the position after the last
    batch handed out, the one a checkpoint should store. Use as a context manager, or
    call ``close()``, to stop the thread.
    """

    def __init__(
        self,
        iterator: StatefulIterator,
        place: Callable[[Any], Any],
        size: int = 2,
    ) -> None:
        if size < 1:
            raise ValueError(f"prefetch size must be at least 1, got {size}.")
        self._iterator = iterator
        self._place = place
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        # Taken before the thread starts, so it is the consumer's position until the
        # first batch is handed out.
        self._state = iterator.get_state()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name="device-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    host = next(self._iterator)
                except StopIteration:
                    self._put(_DONE)
                    return
                state = self._iterator.get_state()
                if not self._put((self._place(host), state)):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
            self._put(_Failure(e))

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[Any, dict[str, Any]]:
        if self._finished:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    # Closed, or the producer died without reporting: never block forever.
                    self._finished = True
                    raise StopIteration from None
        if item is _DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            raise item.error
        batch, state = item
        self._state = state
        return batch, state

    def get_state(self) -> dict[str, Any]:
        """The data position after the last batch returned by ``next``."""
        return self._state

    def close(self) -> None:
        """Stops the background thread; batches read ahead are dropped."""
        self._stop.set()
        self._finished = True
        self._thread.join()

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
