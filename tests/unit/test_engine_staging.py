"""Engine-side staging in the driver's flow (pure, scripted engines and trainers): the
buckets go into the engines before the pause, the pause holds one apply per engine, and
what fails before the pause is dropped with nothing paused."""

from __future__ import annotations

import pytest

from tests.unit.test_driver_flow import ScriptedEngine, ScriptedTrainers, _sync
from weightsync.driver import UpdateFailed
from weightsync.engines.base import Applied
from weightsync.worker import TrainerSync


class StagingEngine(ScriptedEngine):
    def apply_staged(self, probe=None):
        return self._step("apply")

    def drop_staged(self):
        return self._step("drop")


class LoggedTrainers(ScriptedTrainers):
    """Writes its sends into the engines' call logs, so the order shows across both."""

    def __init__(self, engines, send_error=None) -> None:
        super().__init__(send_error)
        self.engines = engines
        self.stage_bounds: list[int] = []

    def run_all(self, fn, *args, timeout_s):
        if fn is TrainerSync.send:
            self.stage_bounds.append(args[1])
            for e in self.engines:
                e.calls.append("push")
        return super().run_all(fn, *args, timeout_s=timeout_s)


def test_the_buckets_move_before_the_pause_and_the_pause_holds_one_apply():
    engines = [StagingEngine("e0"), StagingEngine("e1")]
    trainers = LoggedTrainers(engines)
    ws = _sync(engines, trainers, engine_stage_bytes=1 << 30)
    stats = ws.update(1)
    assert trainers.stage_bounds == [1 << 30] and stats.verified
    for e in engines:
        assert e.calls == [
            "push",
            "pause",
            "flush",
            "apply",
            "complete",
            "verify",
            "version",
            "resume",
        ]


def test_a_push_that_fails_before_the_pause_drops_what_was_staged_and_pauses_nothing():
    engines = [StagingEngine("e0"), StagingEngine("e1")]
    trainers = LoggedTrainers(engines, send_error=RuntimeError("engine 'e1' cannot hold it"))
    ws = _sync(engines, trainers, engine_stage_bytes=1 << 30)
    with pytest.raises(UpdateFailed, match="cannot hold"):
        ws.update(1)
    for e in engines:
        assert e.calls == ["push", "drop"]  # never paused: the old weights served throughout


def test_engine_staging_is_refused_for_engines_without_it():
    from weightsync import EngineSpec, SyncConfig, WeightSync

    spec = EngineSpec(kind="sglang", url="http://127.0.0.1:30000")
    with pytest.raises(ValueError, match=r"engine_stage_bytes.*vLLM.*cannot hold an update"):
        WeightSync(ScriptedTrainers(), [spec], SyncConfig(engine_stage_bytes=1 << 20))


class AnsweringEngine(StagingEngine):
    """Its apply also answers completeness and the fingerprints (as the vLLM plugin does)."""

    def apply_staged(self, probe=None):
        self._step("apply")
        digests = None if probe is None else dict(self.holds)
        return Applied(load_s=0.01, readback_s=0.0, session=self.session, digests=digests)


def test_an_apply_that_answers_completeness_and_verify_spares_their_round_trips():
    engine = AnsweringEngine("e0")
    stats = _sync([engine], LoggedTrainers([engine]), engine_stage_bytes=1 << 30).update(1)
    assert engine.calls == ["push", "pause", "flush", "apply", "version", "resume"]
    assert stats.verified and stats.apply_s == 0.01


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("holds", {"w": "old"}, "differ from the trainer's"),
        ("session", [{"received": {"w": 3}, "unloaded": []}], "did not load"),
    ],
)
def test_what_the_apply_answered_is_held_to_the_same_checks(field, value, match):
    engine = AnsweringEngine("e0")
    setattr(engine, field, value)
    ws = _sync([engine], LoggedTrainers([engine]), engine_stage_bytes=1 << 30)
    with pytest.raises(UpdateFailed, match=match):
        ws.update(1)
    assert ws.stale == {"e0"} and "1" not in engine.versions  # never stamped as whole


class UnreadableEngine(AnsweringEngine):
    """Loads, but its read-back fails: the apply answers no digests (as a vLLM rank whose
    proof raised does), and asking again fails too."""

    def apply_staged(self, probe=None):
        self._step("apply")
        return Applied(load_s=0.01, readback_s=0.0, session=self.session, digests=None)

    def live_digests(self, probe):
        self._step("verify")
        raise RuntimeError("read-back failed")


def test_a_read_back_that_fails_after_the_apply_holds_that_engine_alone():
    good, bad = AnsweringEngine("e0"), UnreadableEngine("e1")
    ws = _sync([good, bad], LoggedTrainers([good, bad]), engine_stage_bytes=1 << 30)
    with pytest.raises(UpdateFailed, match="read-back failed"):
        ws.update(1)
    assert good.versions == ["1"] and good.calls[-1] == "resume"
    assert ws.stale == ws.held == {"e1"} and "resume" not in bad.calls
