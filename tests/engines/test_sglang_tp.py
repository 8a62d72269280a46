"""The SGLang adapter against a TP=2 protocol server: two rank processes, each joining the
update group at ``rank_offset + tp_rank``, receiving every bucket and keeping its own shard.

The engine state the tests read is reassembled from both ranks' shards, so an update that
reached one rank only, or a shard cut the wrong way, does not match. Both update paths
round-trip bit-exactly, twice; a rank that refuses fails the update with its own message.
Last, the whole path: WeightSync drives updates from a megatron TP=2 trainer on Ray into the
TP=2 server, which then holds exactly the weights the trainer exports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from tests.engines.test_sglang_adapter import WAIT_S, _engine, _plan, assert_bit_exact, run_update
from tests.sglang_fixture_ranks import shard, split_dim, unshard
from tests.sglang_protocol_server import ProtocolServer, tiny_qwen2
from weightsync.net import free_port
from weightsync.transport.broadcast import BroadcastSender, destroy_weight_group, init_weight_group
from weightsync.transport.ipc import IpcPayloadSender

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("sglang_structs")]
TP = 2


@pytest.fixture(scope="module")
def server():
    srv = ProtocolServer(seed=0, tp_size=TP)
    yield srv
    srv.stop()


@pytest.fixture
def fresh(server):
    server.reset()
    return server


@pytest.fixture(scope="module")
def weights() -> dict[int, dict[str, torch.Tensor]]:
    """The engine's initial weights (seed 0) and two different trainer updates (1, 2)."""
    return {s: dict(tiny_qwen2(seed=s).state_dict()) for s in (0, 1, 2)}


def test_shards_are_cut_like_sglangs_loader_and_reassemble(weights):
    full = weights[1]
    dims = {name: split_dim(name, t.dim()) for name, t in full.items()}
    assert dims["model.layers.0.self_attn.k_proj.bias"] == 0  # column-parallel bias
    assert dims["model.layers.0.mlp.down_proj.weight"] == 1
    assert dims["lm_head.weight"] == dims["model.embed_tokens.weight"] == 0
    assert dims["model.norm.weight"] is None
    for name, tensor in full.items():
        pieces = [shard(name, tensor, rank, TP) for rank in range(TP)]
        assert torch.equal(unshard(name, pieces), tensor), name
    norm = full["model.norm.weight"]
    with pytest.raises(ValueError, match="replicated, but TP rank 1 differs"):
        unshard("model.norm.weight", [norm, norm + 1])


@contextlib.contextmanager
def _group(engine) -> Iterator[BroadcastSender]:
    """The trainer (rank 0) and the engine's TP ranks (1 and 2) in one gloo group."""
    port, world = free_port(), 1 + TP
    joining = engine.init_group("127.0.0.1", port, rank_offset=1, world_size=world, backend="gloo")
    group = init_weight_group("127.0.0.1", port, world, 0, engine.group_name, timeout_s=WAIT_S)
    try:
        joining.wait(WAIT_S)
        yield BroadcastSender(group, timeout_s=WAIT_S)
    finally:
        engine.destroy_group()
        destroy_weight_group(group)


def test_broadcast_path_reaches_both_ranks(fresh, weights):
    engine = _engine(fresh, group_name="ws-sglang-tp2", tp_size=TP)
    assert engine.ranks() == TP
    with _group(engine) as sender:
        for step in (1, 2):
            run_update(engine, _plan(weights[step]), weights[step], sender, version=f"s{step}")
            assert_bit_exact(fresh.state(), weights[step])
    assert engine.get_version() == "s2"
    init = next(e for e in fresh.log() if e["path"] == "/init_weights_update_group")
    assert (init["body"]["rank_offset"], init["body"]["world_size"]) == (1, 1 + TP)


def test_tensor_path_loads_each_ranks_own_payload(fresh, weights):
    engine = _engine(fresh, path="tensor", tp_size=TP)
    sender = IpcPayloadSender("cpu", tp_size=TP)
    for step in (1, 2):
        run_update(engine, _plan(weights[step]), weights[step], sender, version=f"t{step}")
        assert_bit_exact(fresh.state(), weights[step])
    updates = [e for e in fresh.log() if e["path"] == "/update_weights_from_tensor"]
    assert updates and all(len(e["body"]["serialized_named_tensors"]) == TP for e in updates)
    assert engine.check_weights(weights[2]) == []


def test_a_rank_that_refuses_fails_the_broadcast_update(fresh, weights):
    fresh.set(refuse_rank=1)
    engine = _engine(fresh, group_name="ws-sglang-tp2-refuse", tp_size=TP)
    new, old = weights[1], weights[0]
    refused = pytest.raises(RuntimeError, match=r"TP rank 1: RuntimeError: refused to load")
    with _group(engine) as sender, refused:
        run_update(engine, _plan(new), new, sender, version="never")
    # Rank 0 loaded what it received, rank 1 nothing: the reassembled tensor is half new.
    name = "model.embed_tokens.weight"
    got, half = fresh.state()[name], new[name].shape[0] // TP
    assert torch.equal(got[:half], new[name][:half]) and torch.equal(got[half:], old[name][half:])
    assert engine.get_version() == "default"


def test_a_rank_that_refuses_a_payload_kills_the_scheduler(fresh, weights):
    fresh.set(refuse_rank=1)
    engine = _engine(fresh, path="tensor", tp_size=TP)
    new = weights[1]
    with pytest.raises(RuntimeError, match=r"HTTP 500: .*TP rank 1: RuntimeError: refused"):
        run_update(engine, _plan(new), new, IpcPayloadSender("cpu", tp_size=TP), version="x")
    assert fresh.status()["dead"].startswith("Scheduler hit an exception")


@pytest.fixture(scope="module")
def trainer_and_server(tmp_path_factory):
    """A megatron TP=2 trainer group on Ray and a TP=2 server launched from its export."""
    from safetensors.torch import save_file

    from tests.engines.test_engine_matrix import _export
    from weightsync.ray_group import TrainerGroup
    from weightsync_demo.policy import PolicyWorker, as_hf_dict

    # tiny_qwen2's dims, with a vocabulary that spreads an update over several 1 MiB buckets.
    hf = tiny_qwen2(seed=3, vocab_size=8192)
    group = TrainerGroup.create(2, tp=2, seed=0, worker_cls=PolicyWorker, timeout_s=WAIT_S * 2)
    srv = None
    try:
        weights = {n: t.to(torch.bfloat16) for n, t in hf.state_dict().items()}
        config = as_hf_dict(hf.config)
        group.run_all(PolicyWorker.build_policy, weights, config, 0.0, None, 2, timeout_s=WAIT_S)
        # Served from the trainer's own export: the names, dtypes and shapes updates carry.
        checkpoint = tmp_path_factory.mktemp("sglang-tp") / "model.safetensors"
        save_file(next(s for s in group.run_all(_export, timeout_s=WAIT_S) if s), checkpoint)
        srv = ProtocolServer(tp_size=TP, checkpoint=str(checkpoint))
        yield group, srv
    finally:
        if srv is not None:
            srv.stop()
        group.shutdown()


def test_weightsync_drives_a_tp2_server_from_a_tp2_trainer(trainer_and_server):
    from tests.engines.test_engine_matrix import _export, _perturb
    from weightsync import SyncConfig, WeightSync
    from weightsync.engines.spec import EngineSpec

    group, srv = trainer_and_server
    spec = EngineSpec(kind="sglang", url=srv.url, name="sg-tp2", tp_size=TP)
    ws = WeightSync(group, [spec], SyncConfig(transport="broadcast", bucket_bytes=1 << 20))
    try:
        for version, seed in enumerate((31, 32), start=1):
            group.run_all(_perturb, seed, timeout_s=WAIT_S)
            stats = ws.update(version)
            assert not stats.stale and stats.num_buckets > 1
            exported = next(s for s in group.run_all(_export, timeout_s=WAIT_S) if s)
            assert_bit_exact(srv.state(), exported)
        assert ws.versions() == {"sg-tp2": "2"}
    finally:
        ws.close()
