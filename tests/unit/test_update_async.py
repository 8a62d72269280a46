"""``WeightSync.update_async`` with scripted engines and trainers (pure, in-process): the
caller is free once the export is staged, the source rank pushes in the background group,
one update in flight, and no outcome is lost."""

from __future__ import annotations

import threading
import time

import pytest

from tests.unit.test_driver_flow import UPDATE_CALLS, ScriptedEngine, ScriptedTrainers, _sync
from weightsync.driver import UpdateFailed
from weightsync.inflight import BACKGROUND_GROUP, UpdateInFlight
from weightsync.sender import SendStats
from weightsync.worker import TrainerSync


class BackgroundTrainers(ScriptedTrainers):
    """The source rank's push waits for ``release`` (an update held in flight)."""

    def __init__(self, send_error: Exception | None = None) -> None:
        super().__init__(send_error)
        self.release = threading.Event()
        self.pushing = threading.Event()
        self.prepared: list[tuple] = []

    def run_all(self, fn, *args, timeout_s):
        if fn is TrainerSync.prepare:
            self.prepared.append(args[1:])
        return super().run_all(fn, *args, timeout_s=timeout_s)

    def run_rank(self, rank, fn, *args, timeout_s, concurrency_group):
        assert (rank, concurrency_group) == (0, BACKGROUND_GROUP)
        if fn is TrainerSync.reset:  # after a failed push, in its group: queued behind it
            self.calls.append("reset@0")
            return None
        assert fn is TrainerSync.send
        self.calls.append(f"push@{rank}")
        self.pushing.set()
        assert self.release.wait(5), "the test never released the push"
        if self.send_error is not None:
            raise self.send_error
        return SendStats(nbytes=1, num_buckets=1, digests={"w": "new"})


def test_the_caller_returns_after_the_export_and_the_engines_update_behind_it():
    engine, trainers = ScriptedEngine("e0"), BackgroundTrainers()
    ws = _sync([engine], trainers)
    handle = ws.update_async(3)
    # Every rank staged the whole export (background=True) before the call returned.
    assert trainers.prepared[-1][-1] is True and trainers.calls == ["prepare"]
    assert trainers.pushing.wait(5) and not handle.done()
    assert engine.calls == ["pause", "flush", "begin"]  # paused, loading from the staged copy
    trainers.release.set()
    stats = handle.result(timeout=5)
    assert stats.version == 3 and stats.verified and engine.versions == ["3"]
    assert engine.calls == UPDATE_CALLS
    assert stats.trainer_blocked_s == handle.export_s <= stats.total_s
    assert "send" not in trainers.calls  # no other rank took part in the push


def test_one_update_in_flight_the_next_call_waits_or_fails_per_config():
    trainers = BackgroundTrainers()
    ws = _sync([ScriptedEngine("e0")], trainers, in_flight="fail")
    handle = ws.update_async(1)
    assert trainers.pushing.wait(5)
    with pytest.raises(UpdateInFlight, match="version 1 is still in flight"):
        ws.update(2)
    with pytest.raises(UpdateInFlight):
        ws.update_async(2)
    trainers.release.set()
    assert handle.result(timeout=5).version == 1
    assert ws.update(2).version == 2

    trainers = BackgroundTrainers()
    ws = _sync([ScriptedEngine("e0")], trainers)  # in_flight="wait", the default
    handle = ws.update_async(1)
    assert trainers.pushing.wait(5)
    threading.Timer(0.2, trainers.release.set).start()
    assert ws.update(2).version == 2 and handle.done() and handle.result().version == 1


def test_a_failure_nobody_collected_is_raised_by_the_next_call():
    trainers = BackgroundTrainers(send_error=RuntimeError("engine 'e0' failed on bucket 2"))
    engine = ScriptedEngine("e0")
    ws = _sync([engine], trainers)
    trainers.release.set()
    first = ws.update_async(1)
    with pytest.raises(UpdateFailed, match="bucket 2"):
        first.result(timeout=5)  # its caller saw the failure: not raised again
    assert engine.calls[-3:] == ["abort", "version", "resume"] and ws.stale == {"e0"}
    assert trainers.calls[-3:] == ["push@0", "reset@0", "reset"]  # queued behind the push
    trainers.send_error = None
    assert ws.update(2).version == 2 and not ws.stale
    second = ws.update_async(3)
    assert second.exception(timeout=5) is None and ws.update(4).version == 4

    trainers.send_error = RuntimeError("engine 'e0' failed on bucket 2")
    unseen = ws.update_async(5)  # its failure is never asked for from the handle...
    deadline = time.monotonic() + 5
    while not unseen.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    trainers.send_error = None
    with pytest.raises(UpdateFailed, match=r"version 5 failed.*bucket 2"):
        ws.update(6)  # ...so the next call raises it, and does not run
    assert ws.update(6).version == 6


def test_close_drains_the_update_in_flight():
    trainers = BackgroundTrainers()
    engine = ScriptedEngine("e0")
    ws = _sync([engine], trainers)
    handle = ws.update_async(1)
    assert trainers.pushing.wait(5)
    threading.Timer(0.2, trainers.release.set).start()
    ws.close()
    assert handle.done() and handle.result().version == 1 and engine.calls[-1] == "resume"
