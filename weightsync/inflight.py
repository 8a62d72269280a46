"""An update that runs in the background while the trainer steps (``WeightSync.update_async``).

The trainer is blocked only for the export: every rank runs the whole export (and int4) into
the source rank's memory and leaves it; the engine side of the update (pause, push from that
staged copy, load, verify, version, resume) then runs on a driver thread, and the source
rank pushes on a thread of its own (Ray's ``weightsync`` concurrency group), beside the
trainer's next step. At most one update is in flight; its outcome is never lost: it is on
the handle, and a failure nobody collected from the handle is raised by the next call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Literal

BACKGROUND_GROUP = "weightsync"
"""The trainer actors' concurrency group the source rank pushes in: a thread of its own, so
the trainer's own calls (the next step) run beside the push."""
InFlightPolicy = Literal["wait", "fail"]
IN_FLIGHT_POLICIES = ("wait", "fail")


class UpdateInFlight(RuntimeError):
    """``SyncConfig.in_flight="fail"``: a call found the previous update still running."""


class UpdateHandle:
    """One background update: ``result()`` waits for its ``SyncStats`` or raises its error."""

    def __init__(self, version: int, export_s: float) -> None:
        self.version = version
        self.export_s = export_s
        """What the trainer was blocked for: the export (and int4) into the staged copy."""
        self._future: Future = Future()
        self._seen = False  # result() or exception() was asked: the caller knows the outcome

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        """The update's ``SyncStats``; raises ``UpdateFailed`` (or what stopped it) when it
        failed, ``TimeoutError`` when it is still running after ``timeout`` seconds."""
        try:
            return self._future.result(timeout)  # its error; TimeoutError while running
        finally:
            self._seen = self._future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return self._future.exception(timeout)
        finally:
            self._seen = self._future.done()

    def _run(self, work: Callable[[], Any]) -> None:
        try:
            self._future.set_result(work())
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks the handle
            self._future.set_exception(e)


class BackgroundSlot:
    """The driver's one slot for a background update."""

    def __init__(self) -> None:
        self.handle: UpdateHandle | None = None
        self._thread: threading.Thread | None = None

    def start(self, version: int, export_s: float, work: Callable[[], Any]) -> UpdateHandle:
        handle = UpdateHandle(version, export_s)
        self._thread = threading.Thread(
            # Not a daemon: an interpreter exiting mid-update still resumes the engines.
            target=handle._run,
            args=(work,),
            name=f"weightsync-update-{version}",
        )
        self.handle = handle
        self._thread.start()
        return handle

    def settle(self, policy: InFlightPolicy, timeout_s: float, caller: str) -> None:
        """Before ``caller`` runs: the update in flight, if any, is over (``wait``) or the
        call is refused (``fail``); a failure of it nobody collected is raised now."""
        handle = self.handle
        if handle is None:
            return
        if not handle.done():
            if policy == "fail":
                raise UpdateInFlight(
                    f"{caller}: the update to version {handle.version} is still in flight "
                    "(SyncConfig.in_flight='fail'); wait for its handle first"
                )
            try:
                handle._future.exception(timeout_s)
            except TimeoutError:
                raise UpdateInFlight(
                    f"{caller}: the update to version {handle.version} is still in flight "
                    f"after {timeout_s:.0f} s"
                ) from None
        self.handle = None
        if not handle._seen:
            handle.result()  # its failure, raised where it can no longer be missed
