"""Run a (name, tensor) producer one step ahead in a thread: export + int4 of the next tensors
overlap the copy into staging and the wait for the engine's acknowledgement.

torch kernels (gathers, the int4 pack, copies) release the GIL, so the producer thread and the
consumer make progress at the same time. The queue is bounded (``depth`` tensors), so the
extra memory is at most ``depth`` tensors beyond what the consumer holds.

The producer generator is touched by the worker thread only: ``close()`` lets it run to its
end (the export is a collective: peers wait for every unit) and joins it, so the owner must
not iterate the generator itself.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

_END = object()


class Prefetcher:
    def __init__(self, source: Iterator[Any], depth: int = 1, timeout_s: float = 300.0) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth}: at least 1")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.timeout_s = timeout_s
        self.wait_s = 0.0
        """Seconds the consumer waited for the producer (the part not hidden by overlap)."""
        self._thread = threading.Thread(target=self._run, name="weightsync-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if self._stop.is_set():
                    continue  # drain only: peers block in the export until every unit is pulled
                self._put(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._error = e
        finally:
            self._put(_END)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            item = self._queue.get(timeout=self.timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no exported tensor within {self.timeout_s:.0f} s") from None
        finally:
            self.wait_s += time.perf_counter() - t0
        if item is _END:
            self._queue.put(_END)  # later calls end too
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item

    def close(self) -> None:
        """Let the producer run to its end without keeping anything, then join it."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()  # free any producer blocked on a full queue
            except queue.Empty:
                break
        self._thread.join(timeout=self.timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the export did not finish within {self.timeout_s:.0f} s")
