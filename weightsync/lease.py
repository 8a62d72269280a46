"""A lease lock: one update at a time, and a crashed owner cannot hold it forever.

The holder names itself and gets the lock for ``lease_s`` seconds, renewed by a heartbeat
while it lives (a failed update's clean-up can outlast any fixed lease); it releases it in
``finally``. A second request while the lease is live is refused (``LockBusy``), never
interleaved. If the holder dies, the heartbeat stops, the lease runs out and the next request
takes over. ``LocalLeaseLock`` serves the drivers of one process; a lock shared across
processes implements ``LeaseLock`` over whatever store they share.

A holder can lose its lease (renewals failing for a whole lease, or another owner taking an
expired one): ``hold`` yields a ``Lease`` whose ``check()`` raises ``LeaseLost`` from then on,
and the driver (WeightSync) checks it before every step. A failed release never hides the result of
the work done under the lease (the lease runs out by itself).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Protocol

log = logging.getLogger("weightsync")


class LockBusy(RuntimeError):
    pass


class LeaseLost(RuntimeError):
    """The lease ran out or went to another owner while this holder was working."""


class Lease:
    """What ``hold`` yields: the holder asks ``check()`` before each step."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._lost: str | None = None

    def lose(self, why: str) -> None:
        self._lost = why

    def check(self) -> None:
        if self._lost is not None:
            raise LeaseLost(f"{self.owner!r} lost the update lease: {self._lost}")


class LeaseLock(Protocol):
    def acquire(self, owner: str, lease_s: float) -> bool: ...

    def release(self, owner: str) -> None: ...

    def holder(self) -> tuple[str, float] | None: ...

    def hold(self, owner: str, lease_s: float) -> contextlib.AbstractContextManager: ...


class _LeaseState:
    """The lock's state machine (shared by the local and the Ray implementations)."""

    def __init__(self) -> None:
        self.owner: str | None = None
        self.expires = 0.0

    def acquire(self, owner: str, lease_s: float) -> bool:
        now = time.monotonic()
        if self.owner is not None and self.owner != owner and now < self.expires:
            return False
        self.owner, self.expires = owner, now + lease_s
        return True

    def release(self, owner: str) -> None:
        if self.owner == owner:
            self.owner = None

    def holder(self) -> tuple[str, float] | None:
        left = self.expires - time.monotonic()
        return (self.owner, left) if self.owner is not None and left > 0 else None


class _HoldMixin:
    @contextlib.contextmanager
    def hold(self, owner: str, lease_s: float) -> Iterator[Lease]:
        if not self.acquire(owner, lease_s):
            held = self.holder()
            who = f"{held[0]!r} for {held[1]:.0f} more s" if held else "another owner"
            raise LockBusy(
                f"a weight update is already in progress (held by {who}); "
                "refusing to interleave a second one"
            )
        lease, stop = Lease(owner), threading.Event()
        beat = threading.Thread(
            target=self._renew, args=(lease, lease_s, stop), daemon=True, name="lease-heartbeat"
        )
        beat.start()
        try:
            yield lease
        finally:
            stop.set()
            beat.join()
            try:
                self.release(owner)
            except Exception as e:  # noqa: BLE001 - the work's own result matters more
                log.warning("weightsync: releasing the update lease failed (it expires): %s", e)

    def _renew(self, lease: Lease, lease_s: float, stop: threading.Event) -> None:
        renewed = time.monotonic()
        while not stop.wait(lease_s / 3):
            try:
                if not self.acquire(lease.owner, lease_s):
                    lease.lose("another owner took it after it expired")
                    return
                renewed = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried while it can be
                if time.monotonic() - renewed >= lease_s:
                    lease.lose(f"no renewal for {lease_s:.1f} s (last error: {e})")
                    return


class LocalLeaseLock(_HoldMixin):
    """In-process lease lock (one driver)."""

    def __init__(self) -> None:
        self._state = _LeaseState()
        self._mutex = threading.Lock()

    def acquire(self, owner: str, lease_s: float) -> bool:
        with self._mutex:
            return self._state.acquire(owner, lease_s)

    def release(self, owner: str) -> None:
        with self._mutex:
            self._state.release(owner)

    def holder(self) -> tuple[str, float] | None:
        with self._mutex:
            return self._state.holder()
