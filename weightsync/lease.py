"""A lease lock: one update at a time, and a crashed owner cannot hold it forever.

The holder names itself and gets the lock for ``lease_s`` seconds, renewed by a heartbeat
while it lives (a failed update's clean-up can outlast any fixed lease); it releases it in
``finally``. A second request while the lease is live is refused (``LockBusy``), never
interleaved. If the holder dies, the heartbeat stops, the lease runs out and the next request
takes over.
``RayLeaseLock`` keeps the state in a named Ray actor so that every driver and trainer of a
cluster shares it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Protocol


class LockBusy(RuntimeError):
    pass


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
    def hold(self, owner: str, lease_s: float) -> Iterator[None]:
        if not self.acquire(owner, lease_s):
            held = self.holder()
            who = f"{held[0]!r} for {held[1]:.0f} more s" if held else "another owner"
            raise LockBusy(
                f"a weight update is already in progress (held by {who}); "
                "refusing to interleave a second one"
            )
        stop = threading.Event()
        beat = threading.Thread(
            target=self._renew, args=(owner, lease_s, stop), daemon=True, name="lease-heartbeat"
        )
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            self.release(owner)

    def _renew(self, owner: str, lease_s: float, stop: threading.Event) -> None:
        while not stop.wait(lease_s / 3):
            try:
                self.acquire(owner, lease_s)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease has slack
                continue


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


class RayLeaseLock(_HoldMixin):
    """Cluster-wide lease lock held by the named Ray actor ``name`` (created on first use)."""

    def __init__(self, name: str = "weightsync-lease", timeout_s: float = 30.0) -> None:
        import ray

        actor_cls = ray.remote(num_cpus=0)(_LeaseState)
        self._actor = actor_cls.options(name=name, get_if_exists=True, lifetime="detached").remote()
        self._timeout_s = timeout_s

    def _call(self, method: str, *args):
        import ray

        return ray.get(getattr(self._actor, method).remote(*args), timeout=self._timeout_s)

    def acquire(self, owner: str, lease_s: float) -> bool:
        return self._call("acquire", owner, lease_s)

    def release(self, owner: str) -> None:
        self._call("release", owner)

    def holder(self) -> tuple[str, float] | None:
        return self._call("holder")
