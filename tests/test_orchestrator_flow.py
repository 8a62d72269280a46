"""The orchestrator's control flow with scripted engines and trainers (pure, in-process).

What the real-process fault suite cannot pin down exactly: the order of the calls each engine
gets, that engines are driven concurrently, and what a failure does to every engine.
"""

from __future__ import annotations

import threading

import pytest

from weightsync.config import SyncConfig
from weightsync.engines.spec import EngineSpec
from weightsync.orchestrator import UpdateFailed, WeightSync
from weightsync.trainer_side import TrainerSync

SEND_STATS = dict.fromkeys(
    ("export_s", "quantize_s", "staged_s", "transfer_s", "engine_load_s"), 0.0
) | {"nbytes": 1, "num_buckets": 1, "digests": {}}


class ScriptedEngine:
    """Records its calls; ``fail`` maps a step to the exception it raises."""

    def __init__(self, name: str, fail: dict[str, Exception] | None = None, barrier=None) -> None:
        self.name, self.fail, self.barrier = name, fail or {}, barrier
        self.calls: list[str] = []

    def _step(self, step: str, result=None):
        self.calls.append(step)
        if step == "pause" and self.barrier is not None:
            self.barrier.wait(timeout=5)  # passes only if every engine is paused at once
        if step in self.fail:
            raise self.fail[step]
        return result

    def pause(self, mode):
        return self._step("pause")

    def flush_cache(self):
        return self._step("flush", True)

    def begin_update(self):
        return self._step("begin")

    def end_update(self):
        return self._step("end")

    def abort_update(self):
        return self._step("abort")

    def set_version(self, version):
        return self._step("version")

    def resume(self):
        return self._step("resume")

    def close(self):
        pass


class ScriptedTrainers:
    def __init__(self, send_error: Exception | None = None) -> None:
        self.send_error = send_error
        self.calls: list[str] = []

    def run_all(self, fn, *args, timeout_s):
        self.calls.append(fn.__name__)
        if fn is TrainerSync.send:
            if self.send_error is not None:
                raise self.send_error
            return [dict(SEND_STATS)]
        return [None, None]


def _sync(engines, trainers, **config) -> WeightSync:
    specs = [
        EngineSpec(kind="vllm", url=f"http://127.0.0.1:{9000 + i}", name=e.name)
        for i, e in enumerate(engines)
    ]
    ws = WeightSync(trainers, specs, SyncConfig(step_timeout_s=10, **config))
    ws.engines = {s.label: e for s, e in zip(specs, engines, strict=True)}
    ws._connected = True  # the transport is the fault suite's business
    return ws


def test_every_engine_gets_the_update_in_order_and_at_once():
    barrier = threading.Barrier(3)
    engines = [ScriptedEngine(f"e{i}", barrier=barrier) for i in range(3)]
    stats = _sync(engines, ScriptedTrainers()).update(1)
    assert stats.version == 1 and not stats.stale
    for e in engines:
        assert e.calls == ["pause", "flush", "begin", "end", "version", "resume"]


def test_in_place_pause_keeps_the_cache():
    engine = ScriptedEngine("e0")
    _sync([engine], ScriptedTrainers(), pause_mode="in_place").update(1)
    assert "flush" not in engine.calls


def test_a_failed_send_aborts_every_session_before_resuming():
    engines = [ScriptedEngine("e0"), ScriptedEngine("e1")]
    trainers = ScriptedTrainers(send_error=RuntimeError("engine 'e1' failed on bucket 3"))
    ws = _sync(engines, trainers)
    with pytest.raises(UpdateFailed, match="e1") as info:
        ws.update(1)
    assert sorted(info.value.stale) == ["e0", "e1"] == sorted(ws.stale)
    assert ws.live_engines == []
    for e in engines:
        assert e.calls == ["pause", "flush", "begin", "abort", "resume"]
    assert trainers.calls[-1] == "reset" and not ws._connected  # the next update reconnects


def test_an_engine_that_cannot_abort_is_still_resumed():
    broken = ScriptedEngine("e0", fail={"abort": TimeoutError("no answer"), "end": OSError("x")})
    ws = _sync([broken, ScriptedEngine("e1")], ScriptedTrainers())
    with pytest.raises(UpdateFailed, match="e0"):
        ws.update(1)
    assert broken.calls[-2:] == ["abort", "resume"] and ws.stale == {"e0", "e1"}


def test_a_failure_before_the_session_names_the_engine_and_resumes_all():
    engines = [ScriptedEngine("e0", fail={"flush": RuntimeError("busy")}), ScriptedEngine("e1")]
    ws = _sync(engines, ScriptedTrainers())
    with pytest.raises(UpdateFailed, match="engine 'e0': busy") as info:
        ws.update(1)
    assert info.value.stale == ["e0"]  # no session opened: only the culprit is stale
    assert [e.calls[-1] for e in engines] == ["resume", "resume"]
    assert all("abort" not in e.calls and "begin" not in e.calls for e in engines)


def test_a_stale_engine_is_live_again_after_a_full_update():
    engines = [ScriptedEngine("e0", fail={"begin": RuntimeError("down")}), ScriptedEngine("e1")]
    ws = _sync(engines, ScriptedTrainers())
    with pytest.raises(UpdateFailed):
        ws.update(1)
    engines[0].fail = {}
    ws._connected = True
    ws.update(2)
    assert not ws.stale and [s.label for s in ws.live_engines] == ["e0", "e1"]


def test_one_engines_refusal_surfaces_without_waiting_for_the_others():
    from concurrent.futures import Future

    from weightsync.engines.vllm import _Pending
    from weightsync.sync import _await_all, _EngineFailed

    class Named:
        def __init__(self, name):
            self.name = name

    stuck, refused, fine = Future(), Future(), Future()
    refused.set_exception(RuntimeError("init_weight_transfer_engine was not called"))
    fine.set_result({})
    pendings = [(Named(n), _Pending(f, n)) for n, f in (("a", stuck), ("b", refused), ("c", fine))]
    with pytest.raises(_EngineFailed) as info:
        _await_all(pendings, timeout_s=60)  # "a" would hold it for a minute
    assert info.value.engine == "b" and "not called" in str(info.value.error)
    with pytest.raises(_EngineFailed) as info:
        _await_all([pendings[0], pendings[2]], timeout_s=0.05)
    assert info.value.engine == "a" and isinstance(info.value.error, TimeoutError)
