"""Rolling updates (``SyncConfig.min_serving``) in the driver's flow, scripted engines and
trainers: the bytes reach every engine first, then the waves switch one after another, each
whole before the next pauses, and a failure leaves no engine serving a mix of versions."""

from __future__ import annotations

import pytest

from tests.unit.test_driver_flow import ScriptedTrainers
from tests.unit.test_driver_flow import _sync as _build
from tests.unit.test_engine_staging import LoggedTrainers, StagingEngine
from weightsync.driver import UpdateFailed
from weightsync.waves import plan_waves

WAVE = ["pause", "flush", "apply", "complete", "verify", "version", "resume"]


class SharedLog(StagingEngine):
    """Also writes its calls into one log shared by the fleet: the order across engines."""

    def __init__(self, name, log, fail=None) -> None:
        super().__init__(name, fail)
        self.log = log

    def _step(self, step, result=None):
        self.log.append((self.name, step))
        return super()._step(step, result)


def _fleet(n, fail=None):
    log: list = []
    engines = [SharedLog(f"e{i}", log, (fail or {}).get(f"e{i}")) for i in range(n)]
    return engines, log


def _sync(engines, min_serving=0.5):
    trainers = LoggedTrainers(engines)
    return _build(engines, trainers, engine_stage_bytes=1 << 30, min_serving=min_serving)


def test_waves_cut_the_fleet_in_order_and_keep_the_fraction_serving():
    assert plan_waves(["a", "b", "c", "d"], 0.0) == [["a", "b", "c", "d"]]
    assert plan_waves(["a", "b", "c", "d"], 0.5) == [["a", "b"], ["c", "d"]]
    assert plan_waves(["a", "b", "c", "d"], 0.75) == [["a"], ["b"], ["c"], ["d"]]
    assert plan_waves(["a", "b", "c"], 0.5) == [["a"], ["b"], ["c"]]
    with pytest.raises(ValueError, match=r"min_serving=0.5 keeps all 1 engines serving"):
        plan_waves(["a"], 0.5)


def test_each_wave_switches_whole_before_the_next_pauses():
    engines, log = _fleet(2)
    stats = _sync(engines).update(1)
    for e in engines:
        assert e.calls == ["push", *WAVE]
    # e0's whole switch, resume included, comes before e1's pause: e1 serves meanwhile.
    e0_done = log.index(("e0", "resume"))
    assert all(step != "pause" for name, step in log[:e0_done] if name == "e1")
    assert [w.engines for w in stats.waves] == [["e0"], ["e1"]]
    assert stats.pause_s == max(w.pause_s for w in stats.waves) > 0
    assert all(e.versions == ["1"] for e in engines) and stats.verified


def test_a_wave_that_fails_leaves_the_switched_live_and_the_rest_whole_but_stale():
    boom = {"e1": {"apply": RuntimeError("staging lost")}}
    engines, _ = _fleet(3, boom)
    ws = _sync(engines, min_serving=0.6)  # waves of one
    with pytest.raises(UpdateFailed, match="staging lost") as info:
        ws.update(1)
    e0, e1, e2 = engines
    assert e0.calls == ["push", *WAVE] and e0.versions == ["1"]
    assert e1.calls == ["push", "pause", "flush", "apply", "abort", "version", "resume"]
    assert e1.versions == ["partial-1"]
    # Never paused, never loaded: drops its staged copy, serves the old weights whole, and
    # is stale (behind the fleet) until the next update.
    assert e2.calls == ["push", "drop"] and e2.versions == []
    assert sorted(info.value.stale) == ["e1", "e2"] == sorted(ws.stale)
    assert [s.label for s in ws.live_engines] == ["e0"]


def test_a_first_wave_that_fails_leaves_the_unreached_engines_live():
    boom = {"e0": {"apply": RuntimeError("staging lost")}}
    engines, _ = _fleet(2, boom)
    ws = _sync(engines)
    with pytest.raises(UpdateFailed):
        ws.update(1)
    assert engines[1].calls == ["push", "drop"]
    assert ws.stale == {"e0"}  # e1 still serves what the whole fleet served before


def test_waves_need_engine_staging_and_a_fleet_that_can_spare_an_engine():
    from weightsync.config import SyncConfig

    with pytest.raises(ValueError, match=r"min_serving.*engine_stage_bytes"):
        SyncConfig(min_serving=0.5)
    with pytest.raises(ValueError, match=r"min_serving=1"):
        SyncConfig(min_serving=1, engine_stage_bytes=1 << 20)
    with pytest.raises(ValueError, match=r"keeps all 1 engines serving"):
        _build([StagingEngine("e0")], ScriptedTrainers(), engine_stage_bytes=1, min_serving=0.5)


def test_in_a_failing_wave_the_engines_that_passed_stay_live():
    engines, _ = _fleet(4)
    engines[3].holds = {"w": "old"}  # fails verify: its kernels compute with other weights
    ws = _sync(engines)  # waves of two
    with pytest.raises(UpdateFailed, match="differ from the trainer's"):
        ws.update(1)
    assert [e.versions for e in engines] == [["1"], ["1"], ["1"], ["partial-1"]]
    assert ws.stale == {"e3"} and ws.held == {"e3"}
    assert [s.label for s in ws.live_engines] == ["e0", "e1", "e2"]


def test_after_a_failed_wave_an_audit_holds_the_switched_engines_to_the_new_version():
    engines, _ = _fleet(3)
    ws = _sync(engines, min_serving=0.6)
    ws.update(1)
    engines[1].fail = {"apply": RuntimeError("staging lost")}
    for e in engines:
        e.holds = {"w": "new2"}
    ws.trainers.digests = {"w": "new2"}
    with pytest.raises(UpdateFailed):
        ws.update(2)
    report = ws.verify()  # e0 holds version 2, verified: the audit compares it with 2
    assert report.ok is False and report.verified == ["e0"] and report.version == 2
    assert sorted(report.failed) == ["e1", "e2"]  # stale since the failed update, not re-held


def test_stale_engines_switch_first_so_the_live_ones_keep_generating():
    engines, _ = _fleet(4)
    ws = _sync(engines)
    ws.stale = {"e2", "e3"}
    stats = ws.update(1)
    assert [w.engines for w in stats.waves] == [["e2", "e3"], ["e0", "e1"]]
    assert not ws.stale
