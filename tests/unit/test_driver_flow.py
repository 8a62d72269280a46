"""The driver's control flow with scripted engines and trainers (pure, in-process).

What the real-process fault suite cannot pin down exactly: the order of the calls each engine
gets, that engines are driven concurrently, and what a failure does to every engine.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from weightsync.config import SyncConfig
from weightsync.driver import UpdateFailed, WeightSync
from weightsync.engines.base import EngineFailed
from weightsync.engines.spec import EngineSpec
from weightsync.sender import SendStats
from weightsync.worker import TrainerSync

UPDATE_CALLS = ["pause", "flush", "begin", "end", "complete", "verify", "version", "resume"]
"""One update, as every engine gets it (verify ``sample``, the default)."""


class ScriptedEngine:
    """Records its calls; ``fail`` maps a step to the exception it raises."""

    verifiable = True

    def __init__(self, name: str, fail: dict[str, Exception] | None = None, barrier=None) -> None:
        self.name, self.fail, self.barrier = name, fail or {}, barrier
        self.calls: list[str] = []
        self.versions: list[str] = []
        self.served = None  # what model_config answers
        self.holds = {"w": "new"}  # what live_digests reads back
        self.session = [{"received": {"w": 4}, "unloaded": []}]  # what session_report says

    def model_config(self):
        return self.served

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

    def live_digests(self, probe):
        return self._step("verify", dict(self.holds))

    def session_report(self):
        return self._step("complete", self.session)

    def aliases(self):
        return {}

    def unrepairable(self):
        return []

    def ranks(self):
        return 1

    def set_version(self, version):
        self.versions.append(version)
        return self._step("version")

    def resume(self):
        return self._step("resume")

    def close(self):
        pass


class ScriptedTrainers:
    def __init__(self, send_error: Exception | None = None) -> None:
        self.send_error = send_error
        self.calls: list[str] = []
        self.on_send = lambda: None
        self.digests = {"w": "new"}  # what the source rank fingerprints as sent

    def run_all(self, fn, *args, timeout_s):
        self.calls.append(fn.__name__)
        if fn is TrainerSync.send:
            self.on_send()
            if self.send_error is not None:
                raise self.send_error
            return [SendStats(nbytes=1, num_buckets=1, digests=dict(self.digests))]
        if fn is TrainerSync.prepare:
            return [{"w": 4}, {"w": 4}]  # what the plan sends: tensor -> elements
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
        assert e.calls == UPDATE_CALLS


@pytest.mark.parametrize("kv_cache", ["recompute", "reuse"])
def test_an_in_place_pause_drops_old_kv_unless_asked_to_reuse_it(kv_cache):
    engine = ScriptedEngine("e0")
    ws = _sync([engine], ScriptedTrainers(), pause_mode="in_place", kv_cache=kv_cache)
    stats = ws.update(1)
    assert stats.kv_cache == kv_cache
    assert ("flush" in engine.calls) == (kv_cache == "recompute")
    assert engine.calls.index("pause") < engine.calls.index("begin")


def test_kv_reuse_needs_an_in_place_pause_and_sglang_cannot_drop_kv_held_in_place():
    with pytest.raises(ValueError, match=r"kv_cache='reuse'.*in_place"):
        SyncConfig(kv_cache="reuse", pause_mode="retract")
    with pytest.raises(ValueError, match=r"kv_cache="):
        SyncConfig(kv_cache="keep")
    spec = EngineSpec(kind="sglang", url="http://127.0.0.1:30000", name="sg")
    with pytest.raises(ValueError, match=r"SGLang engines \['sg'\] cannot drop the KV"):
        WeightSync(ScriptedTrainers(), [spec], SyncConfig(pause_mode="in_place"))
    ok = SyncConfig(pause_mode="in_place", kv_cache="reuse")
    WeightSync(ScriptedTrainers(), [spec], ok).close()


def test_a_failed_send_aborts_every_session_before_resuming():
    engines = [ScriptedEngine("e0"), ScriptedEngine("e1")]
    trainers = ScriptedTrainers(send_error=RuntimeError("engine 'e1' failed on bucket 3"))
    ws = _sync(engines, trainers)
    with pytest.raises(UpdateFailed, match="e1") as info:
        ws.update(1)
    assert sorted(info.value.stale) == ["e0", "e1"] == sorted(ws.stale)
    assert ws.live_engines == []
    for e in engines:
        assert e.calls == ["pause", "flush", "begin", "abort", "version", "resume"]
        assert e.versions == ["partial-1"]  # serving a mix of versions, and saying so
    assert trainers.calls[-1] == "reset" and not ws._connected  # the next update reconnects


def test_an_engine_that_cannot_abort_is_still_resumed():
    broken = ScriptedEngine("e0", fail={"abort": TimeoutError("no answer"), "end": OSError("x")})
    ws = _sync([broken, ScriptedEngine("e1")], ScriptedTrainers())
    with pytest.raises(UpdateFailed, match="e0"):
        ws.update(1)
    assert broken.calls[-3:] == ["abort", "version", "resume"] and ws.stale == {"e0", "e1"}


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

    from weightsync.engines.http import InFlight
    from weightsync.sender import _await_all

    class Named:
        def __init__(self, name):
            self.name = name

    stuck, refused, fine = Future(), Future(), Future()
    refused.set_exception(RuntimeError("init_weight_transfer_engine was not called"))
    fine.set_result({})
    pendings = [(Named(n), InFlight(f, n)) for n, f in (("a", stuck), ("b", refused), ("c", fine))]
    with pytest.raises(EngineFailed) as info:
        _await_all(pendings, timeout_s=60)  # "a" would hold it for a minute
    assert info.value.engines == ("b",) and "not called" in str(info.value)
    with pytest.raises(EngineFailed) as info:
        _await_all([pendings[0], pendings[2]], timeout_s=0.05)
    assert info.value.engines == ("a",) and isinstance(info.value.__cause__, TimeoutError)


def test_an_engine_that_fails_to_resume_stays_out_of_live_engines():
    engines = [ScriptedEngine("e0", fail={"resume": TimeoutError("still paused")})]
    engines.append(ScriptedEngine("e1"))
    ws = _sync(engines, ScriptedTrainers())
    ws.update(1)  # the weights landed everywhere; e0 may still be paused
    assert ws.stale == {"e0"} and [s.label for s in ws.live_engines] == ["e1"]


def test_a_model_config_mismatch_is_refused_before_any_pause():
    from weightsync.model_config import summary

    cfg = dict(vocab_size=32, hidden_size=128, num_attention_heads=2, num_hidden_layers=2)
    engines = [ScriptedEngine("e0"), ScriptedEngine("e1")]
    engines[1].served = summary(cfg | {"tie_word_embeddings": True})
    engines[0].served = summary(cfg)
    ws = _sync(engines, ScriptedTrainers())
    ws._model = summary(cfg)
    with pytest.raises(ValueError, match=r"e1.*tie_word_embeddings: trainer False, engine True"):
        ws.update(1)
    assert all(e.calls == [] for e in engines)


class Unreadable(ScriptedEngine):
    verifiable = False  # SGLang: says nothing of what it loaded, cannot read back

    def session_report(self):
        return self._step("complete", None)


def test_an_engine_that_cannot_read_back_is_named_unverified_never_verified():
    vllm, sglang = ScriptedEngine("v"), Unreadable("sg")
    stats = _sync([vllm, sglang], ScriptedTrainers()).update(1)
    assert not stats.stale and stats.verify == "sample"
    assert stats.unverified == ["sg"] and stats.verified is False
    assert "verify" in vllm.calls and "verify" not in sglang.calls
    off = _sync([ScriptedEngine("v")], ScriptedTrainers(), verify="off").update(1)
    assert off.verify == "off" and not off.verified and off.unverified == []


def test_completeness_is_checked_with_verify_off_and_names_what_was_not_loaded():
    partial, whole = ScriptedEngine("partial"), ScriptedEngine("whole")
    partial.session = [
        {"received": {"w": 4}, "unloaded": []},
        {"received": {}, "unloaded": ["model.layers.1.mlp (0 of 8 elements)"]},
    ]
    ws = _sync([partial, whole], ScriptedTrainers(), verify="off")
    with pytest.raises(UpdateFailed, match=r"rank 1 did not load 1 of the 1 tensors.*\['w'\]"):
        ws.update(2)
    assert ws.stale == ws.held == {"partial"} and whole.versions == ["2"]
    assert "verify" not in partial.calls and partial.calls[-1] != "resume"  # held paused
    partial.session[1]["received"] = {"w": 4}
    ws._connected = True  # a failure tears the transport down: the fault suite's business
    with pytest.raises(UpdateFailed, match=r"rank 1 left 1 layers.*model\.layers\.1\.mlp"):
        ws.update(3)
    partial.session[1]["unloaded"] = []
    ws._connected = True
    assert not ws.update(4).stale and not ws.held and partial.calls[-1] == "resume"


def test_an_engine_whose_post_processing_cannot_be_redone_is_refused_at_connect():
    engine = ScriptedEngine("moe")
    engine.unrepairable = lambda: ["model.layers.0.mlp.experts: MoE experts without a kernel"]
    ws = _sync([engine], ScriptedTrainers())
    ws._connected = False
    with pytest.raises(ValueError, match=r"could not redo.*moe.*model\.layers\.0\.mlp\.experts"):
        ws.update(1)
    assert engine.calls == [] and "install" not in ws.trainers.calls


@pytest.mark.parametrize("on_failure", ["hold", "resume"])
def test_an_engine_that_fails_verify_is_stale_and_the_verified_ones_stay_live(on_failure):
    good, bad = ScriptedEngine("good"), ScriptedEngine("bad")
    bad.holds = {"w": "old"}
    ws = _sync([good, bad], ScriptedTrainers(), on_verify_failure=on_failure)
    ws.stale = {"good"}  # an earlier failure: a verified update makes it live again
    with pytest.raises(UpdateFailed, match=r"verify sample.*\['w'\]") as info:
        ws.update(4)
    assert info.value.stale == ["bad"] and ws.stale == {"bad"}
    assert [s.label for s in ws.live_engines] == ["good"]
    assert good.calls == UPDATE_CALLS
    assert good.versions == ["4"] and bad.versions == ["partial-4"]
    if on_failure == "hold":  # paused, serving nothing, until an update verifies it
        assert ws.held == {"bad"} and bad.calls[-2:] == ["abort", "version"]
    else:
        assert not ws.held and bad.calls[-3:] == ["abort", "version", "resume"]


def test_a_derived_copy_is_held_to_the_weight_it_was_derived_from():
    """MLA's decode copies are read back as ``<weight>#decode`` and must equal the trainer's
    fingerprint of ``<weight>``: a stale copy fails verify, named, while the weight is right."""
    fresh, stale = ScriptedEngine("fresh"), ScriptedEngine("stale")
    fresh.holds = {"w": "new", "w#decode": "new"}
    stale.holds = {"w": "new", "w#decode": "old"}
    ws = _sync([fresh, stale], ScriptedTrainers())
    with pytest.raises(UpdateFailed, match=r"verify sample.*\['w#decode'\]") as info:
        ws.update(1)
    assert info.value.stale == ["stale"] and [s.label for s in ws.live_engines] == ["fresh"]


def test_verify_audits_without_sending_and_holds_what_changed():
    good, touched = ScriptedEngine("good"), ScriptedEngine("touched")
    ws = _sync([good, touched], ScriptedTrainers())
    with pytest.raises(ValueError, match="no update was verified yet"):
        ws.verify()
    ws.update(1)
    sends = ws.trainers.calls.count("send")
    report = ws.verify()
    assert report.ok and report.verified == ["good", "touched"] and report.version == 1
    touched.holds = {"w": "restarted from the checkpoint"}
    report = ws.verify()
    assert (
        not report.ok and list(report.failed) == ["touched"] and "['w']" in report.failed["touched"]
    )
    assert ws.trainers.calls.count("send") == sends  # nothing was sent
    assert ws.stale == ws.held == {"touched"} and touched.calls[-1] == "pause"
    with pytest.raises(ValueError, match="verified at 'sample'"):
        ws.verify("full")
    touched.holds = {"w": "new"}
    assert not ws.update(2).stale and ws.verify().ok  # the next update repairs it


def test_a_session_left_open_is_recovered_through_abort():
    from weightsync.engines.vllm import VllmEngine, VllmEngineConfig

    engine = VllmEngine(VllmEngineConfig(url="http://127.0.0.1:9"))
    calls = []

    def call(method, path, timeout_s=None, **kw):
        calls.append(path if path != "/collective_rpc" else kw["json"]["args"][0])
        if path == "/start_weight_update" and calls.count(path) == 1:
            raise RuntimeError("start_weight_update called while a weight update is already active")
        return {"results": [{"aborted": True}]}

    engine._call = call
    engine.begin_update()
    # half-loaded layers discarded (abort), never finalized as they are
    assert calls == [
        "/start_weight_update",
        "abort",
        "/finish_weight_update",
        "/start_weight_update",
    ]
    engine.close()


class _Joining:
    """A data plane that records the links it was asked to join."""

    def __init__(self, name: str) -> None:
        self.name, self.links = name, []

    def check_link(self, link):
        pass

    def join(self, link):
        from concurrent.futures import Future

        from weightsync.engines.http import InFlight

        self.links.append(link)
        done = Future()
        done.set_result({})
        return InFlight(done, self.name)


class _Planner:
    is_source = True

    def prepare(self):
        from types import SimpleNamespace

        return SimpleNamespace(max_bucket_nbytes=1 << 20)


def test_shm_ring_counts_one_consumer_per_engine_rank():
    from weightsync.worker import _open_shm, _State

    specs = [
        EngineSpec(kind="vllm", url="http://127.0.0.1:1", name="a", tp_size=2),
        EngineSpec(kind="vllm", url="http://127.0.0.1:2", name="b"),
    ]
    from weightsync.transport.shm import SHM_DIR

    engines = [_Joining("a"), _Joining("b")]
    state = _State(_Planner(), specs, SyncConfig(transport="ipc"), engines)
    _open_shm(state)
    try:
        (a,), (b,) = engines[0].links, engines[1].links
        assert a.ring.num_consumers == 3  # 2 + 1 engine ranks, not 2 engines
        assert (a.consumer_index, b.consumer_index) == (0, 2)
        # Unlinked once every engine joined: no rank has to know whether it attached last.
        assert not any((Path(SHM_DIR) / n).exists() for n in a.ring.names)
    finally:
        state.ring.close()


def test_an_nccl_trainer_is_refused_by_the_vllm_plugin_before_any_request():
    from weightsync.engines.base import BroadcastLink

    engine = EngineSpec(kind="vllm", url="http://127.0.0.1:1", name="a").connect()
    link = BroadcastLink(
        master_address="127.0.0.1",
        master_port=1,
        world_size=2,
        rank_offset=1,
        group_name="g",
        backend="nccl",
    )
    with pytest.raises(ValueError, match=r"'a'.*uses nccl.*joins with gloo"):
        engine.join(link)  # no server behind the URL: it raised before any request
    engine.close()


def test_a_broadcast_link_refused_by_one_engine_sends_no_engine_a_join(monkeypatch):
    """A GPU trainer (nccl) with a mixed fleet: the vLLM plugin refuses nccl before the SGLang
    engine listed first is asked to join (it would wait for a group nobody hosts)."""
    import weightsync.worker as worker
    from weightsync.worker import _open_broadcast, _State

    class Checking(_Joining):
        def check_link(self, link):
            self.links.append(("checked", link.group_name))

    monkeypatch.setattr(worker, "_group_backend", lambda: "nccl")
    specs = [
        EngineSpec(kind="sglang", url="http://127.0.0.1:1", name="sg"),
        EngineSpec(kind="vllm", url="http://127.0.0.1:2", name="vl"),
    ]
    first, names = Checking("sg"), []
    for _ in range(2):
        first.links.clear()
        engines = [first, specs[1].connect()]
        state = _State(_Planner(), specs, SyncConfig(), engines)
        with pytest.raises(ValueError, match=r"'vl'.*uses nccl"):
            _open_broadcast(state)
        (checked,) = first.links  # asked, never joined
        names.append(checked[1])
        engines[1].close()
    assert names[0] != names[1]  # a group name per connection: a late group blocks no retry


def test_a_refused_flush_marks_exactly_the_refusing_engines_stale():
    class Refusing(ScriptedEngine):
        def flush_cache(self):
            self.calls.append("flush")
            return False

    engines = [Refusing("e0"), ScriptedEngine("e1")]
    with pytest.raises(UpdateFailed, match=r"e0.*refused to flush") as info:
        _sync(engines, ScriptedTrainers()).update(1)
    assert info.value.stale == ["e0"] and [e.calls[-1] for e in engines] == ["resume", "resume"]


def test_an_engine_serving_more_ranks_than_its_spec_is_refused_before_any_pause():
    class TwoRanks(ScriptedEngine):
        def ranks(self):
            return 2

    engines, trainers = [TwoRanks("e0"), ScriptedEngine("e1")], ScriptedTrainers()
    engines[1].ranks = lambda: 1
    ws = _sync(engines, trainers)
    ws._connected = False  # the rank count is asked when connecting
    with pytest.raises(ValueError, match=r"e0: tp_size=1, engine 2"):
        ws.update(1)
    assert all(e.calls == [] for e in engines) and trainers.calls == []


def test_transport_combinations_no_update_could_run_are_refused_when_built():
    sg = EngineSpec(kind="sglang", url="http://127.0.0.1:9", name="sg")
    with pytest.raises(ValueError, match=r"transport='ipc'.*\['sg'\]"):
        WeightSync(ScriptedTrainers(), [sg], SyncConfig(transport="ipc"))
    with pytest.raises(ValueError, match="transport='disk' is invalid"):
        SyncConfig(transport="disk")


def test_an_update_that_lost_its_lease_stops_at_the_next_step_and_resumes():
    import contextlib

    engines, trainers = [ScriptedEngine("e0")], ScriptedTrainers()
    ws = _sync(engines, trainers)
    leases, hold = [], ws.lock.hold

    @contextlib.contextmanager
    def watched_hold(owner, lease_s):
        with hold(owner, lease_s) as lease:
            leases.append(lease)
            yield lease

    ws.lock.hold = watched_hold
    trainers.on_send = lambda: leases[0].lose("another owner took it")
    with pytest.raises(UpdateFailed, match="lost the update lease"):
        ws.update(1)
    # No end_update or version under a lost lease; the session is aborted and resumed.
    assert engines[0].calls == ["pause", "flush", "begin", "abort", "version", "resume"]
    assert engines[0].versions == ["partial-1"]


def test_a_held_engine_stays_held_when_a_later_update_fails_elsewhere():
    good, bad = ScriptedEngine("good"), ScriptedEngine("bad")
    bad.holds = {"w": "old"}
    trainers = ScriptedTrainers()
    ws = _sync([good, bad], trainers)
    with pytest.raises(UpdateFailed):
        ws.update(1)
    assert ws.held == {"bad"}
    trainers.send_error = RuntimeError("engine 'good' failed on bucket 0")
    ws._connected = True
    with pytest.raises(UpdateFailed):
        ws.update(2)
    assert ws.held == {"bad"} and bad.calls[-1] != "resume"  # still serving nothing
    assert good.calls[-1] == "resume"


def test_an_audit_after_a_partly_failed_update_holds_only_what_changed():
    good, bad = ScriptedEngine("good"), ScriptedEngine("bad")
    ws = _sync([good, bad], ScriptedTrainers())
    ws.update(1)
    bad.holds = {"w": "old"}
    with pytest.raises(UpdateFailed):
        ws.update(2)
    report = ws.verify()  # "good" holds version 2, proven: the audit compares with that
    assert report.version == 2 and report.verified == ["good"]
    assert list(report.failed) == ["bad"] and ws.held == {"bad"}


def test_verify_as_a_bool_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'sample'"):
        assert SyncConfig(verify=True).verify == "sample"
    with pytest.warns(DeprecationWarning):
        assert SyncConfig(verify=False).verify == "off"
