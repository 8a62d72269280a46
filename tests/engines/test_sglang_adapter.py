"""The SGLang adapter against the protocol server (a separate process speaking SGLang's HTTP API).

Both update paths round-trip bit-exactly: the gloo broadcast group (SGLang's NCCL path) and
serialized CPU payloads (SGLang's CUDA-IPC path). Bad input must fail before the engine is
paused, which the server's request log shows.
"""

from __future__ import annotations

import logging
import time

import pybase64
import pytest
import requests
import torch

from tests.sglang_protocol_server import ProtocolServer, tiny_qwen2
from weightsync.engines.sglang import SGLangConfig, SGLangEngine
from weightsync.net import free_port
from weightsync.plan import TensorMeta, build_plan
from weightsync.transport.base import Ticket, send_stream
from weightsync.transport.broadcast import BroadcastSender, destroy_weight_group, init_weight_group
from weightsync.transport.ipc import IpcPayloadSender

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("sglang_structs")]
WAIT_S = 60.0
UPDATE_FLOW = [
    "/model_info",  # validate(): the checkpoint manifest
    "/pause_generation",
    "/flush_cache",
    "/begin_weight_update",
]
CLOSE_FLOW = ["/end_weight_update", "/update_weight_version", "/continue_generation"]


@pytest.fixture(scope="module")
def server():
    srv = ProtocolServer(seed=0)
    yield srv
    srv.stop()


@pytest.fixture
def fresh(server):
    server.reset()
    return server


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """The engine's initial weights (seed 0) and the trainer's new ones (seed 1)."""
    return {f"seed{s}": dict(tiny_qwen2(seed=s).state_dict()) for s in (0, 1)}


def _plan(named: dict[str, torch.Tensor], bucket_bytes: int = 48 << 10):
    def unit(name: str) -> str:
        return ".".join(name.split(".")[:3]) if ".layers." in name else name

    metas = [TensorMeta(n, t.dtype, tuple(t.shape), unit(n)) for n, t in named.items()]
    return build_plan(metas, bucket_bytes)


def _engine(server: ProtocolServer, **fields) -> SGLangEngine:
    return SGLangEngine(SGLangConfig(url=server.url, timeout_s=WAIT_S, **fields))


def run_update(engine, plan, named, sender, version: str, mode: str = "retract") -> None:
    """the driver's sequence, keeping one bucket in flight as WeightSender does."""
    engine.validate(plan, named.items())
    engine.pause(mode)
    assert engine.flush_cache(), engine.flush_error
    engine.begin_update()
    in_flight: list = []

    def on_sent(bucket, ticket: Ticket) -> None:
        in_flight.append((ticket, engine.update_bucket(bucket, ticket)))
        if len(in_flight) > 1:
            done, pending = in_flight.pop(0)
            pending.wait(WAIT_S)
            sender.acknowledge(done)

    send_stream(sender, plan, iter(named.items()), on_sent)
    for ticket, pending in in_flight:
        pending.wait(WAIT_S)
        sender.acknowledge(ticket)
    engine.end_update()
    engine.set_version(version)
    engine.resume()


def assert_bit_exact(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_broadcast_path_round_trips_bit_exactly(fresh, weights):
    new = weights["seed1"]
    plan = _plan(new)
    assert len(plan.buckets) >= 3 and all(len(b.groups) == 2 for b in plan.buckets[1:-1])
    engine = _engine(fresh, group_name="ws-sglang-bcast")
    port = free_port()
    joining = engine.init_group("127.0.0.1", port, rank_offset=1, world_size=2, backend="gloo")
    group = init_weight_group("127.0.0.1", port, 2, 0, "ws-sglang-bcast", timeout_s=WAIT_S)
    try:
        joining.wait(WAIT_S)
        run_update(engine, plan, new, BroadcastSender(group, timeout_s=WAIT_S), version="step-1")
    finally:
        engine.destroy_group()
        destroy_weight_group(group)
    assert_bit_exact(fresh.state(), new)
    assert engine.get_version() == "step-1" and engine.legacy is False

    log = fresh.log()
    updates = [e for e in log if e["path"] == "/update_weights_from_distributed"]
    assert [e["path"] for e in log if e not in updates][1:] == [
        *UPDATE_FLOW,
        *CLOSE_FLOW,
        "/destroy_weights_update_group",
        "/model_info",
    ]
    assert len(updates) == len(plan.buckets)
    for bucket, entry in zip(plan.buckets, updates, strict=True):
        body = entry["body"]
        assert body["names"] == bucket.names() and body["group_name"] == "ws-sglang-bcast"
        assert (body["load_format"], body["flush_cache"]) == ("flattened_bucket", False)
        assert body["dtypes"] == [str(d).removeprefix("torch.") for _, d, _ in bucket.metas()]
        assert body["shapes"] == [list(s) for _, _, s in bucket.metas()]
    version_call = next(e for e in log if e["path"] == "/update_weight_version")
    assert version_call["body"] == {"new_version": "step-1", "abort_all_requests": False}


def test_tensor_path_round_trips_bit_exactly(fresh, weights):
    new = weights["seed1"]
    engine = _engine(fresh, path="tensor")
    assert engine.ranks() == 1  # TP=2: tests/engines/test_sglang_tp.py
    plan = _plan(new)
    run_update(engine, plan, new, IpcPayloadSender("cpu"), version="7")
    assert_bit_exact(fresh.state(), new)
    assert engine.get_version() == "7"
    updates = [e for e in fresh.log() if e["path"] == "/update_weights_from_tensor"]
    assert len(updates) == len(plan.buckets)
    assert all(len(e["body"]["serialized_named_tensors"]) == 1 for e in updates)
    assert engine.check_weights(new) == []
    old = weights["seed0"]
    changed = sorted(n for n in new if not torch.equal(old[n], new[n]))  # norms stay all-ones
    assert len(changed) > 10 and sorted(engine.check_weights(old)) == changed


def test_legacy_server_falls_back_and_says_so(fresh, weights, caplog):
    new = weights["seed1"]
    fresh.set(legacy=True)
    engine = _engine(fresh, path="tensor")
    with caplog.at_level(logging.WARNING, logger="weightsync.engines.sglang"):
        run_update(engine, _plan(new), new, IpcPayloadSender("cpu"), version="legacy-1")
    assert engine.legacy is True
    assert "older than 0.5.21" in caplog.text and "legacy flow" in caplog.text
    paths = fresh.paths()
    assert "/begin_weight_update" in paths and "/end_weight_update" not in paths
    assert_bit_exact(fresh.state(), new)
    assert engine.get_version() == "legacy-1"


@pytest.mark.parametrize("bad", ["unknown name", "shape", "dtype", "nan", "extra tensor"])
def test_bad_input_fails_before_pause(fresh, weights, bad):
    new = dict(weights["seed1"])
    name = "model.layers.1.mlp.up_proj.weight"
    plan_named = new
    if bad == "unknown name":
        new = {
            ("model.layers.1.mlp.upp_proj.weight" if k == name else k): v for k, v in new.items()
        }
        plan_named, match = new, "'model.layers.1.mlp.upp_proj.weight' is not in the engine"
    elif bad == "shape":
        new[name] = new[name][:, :-1].contiguous()
        plan_named, match = new, rf"'{name}': the update sends bfloat16 \(128, 63\)"
    elif bad == "dtype":
        new[name] = new[name].half()
        plan_named, match = new, rf"'{name}': the update sends float16"
    elif bad == "nan":
        new[name] = new[name].clone()
        new[name][3, 5] = float("nan")
        match = rf"'{name}': 1 non-finite value"
    else:
        plan_named = {k: v for k, v in new.items() if k != name}
        match = rf"'{name}' is not in the bucket plan"
    engine = _engine(fresh, path="tensor")
    with pytest.raises(ValueError, match=match):
        run_update(engine, _plan(plan_named), new, IpcPayloadSender("cpu"), version="bad")
    assert "/pause_generation" not in fresh.paths()
    assert fresh.status()["paused"] is None
    assert_bit_exact(fresh.state(), weights["seed0"])


def test_incomplete_full_update_is_refused(fresh, weights):
    partial = {k: v for k, v in weights["seed1"].items() if "lm_head" not in k}
    engine = _engine(fresh, require_full=True)
    with pytest.raises(ValueError, match=r"leaves out 1 tensor.*lm_head.weight"):
        engine.validate(_plan(partial))


def test_bad_payload_never_reaches_the_server(fresh, weights):
    new = weights["seed1"]
    plan = _plan(new)
    engine = _engine(fresh, path="tensor")
    sender = IpcPayloadSender("cpu")
    sender.buffers(plan.buckets[0])
    wrong = sender.send(plan.buckets[0], {})  # bucket 0's payload offered as bucket 1
    with pytest.raises(ValueError, match="bucket 1 payload for TP rank 0: metadata"):
        engine.update_bucket(plan.buckets[1], Ticket(1, payloads=wrong.payloads))
    rogue = pybase64.b64encode(b"cos\nsystem\n(S'true'\ntR.").decode()
    with pytest.raises(ValueError, match=r"Blocked unsafe global \(os.system\)"):
        engine.update_bucket(plan.buckets[1], Ticket(1, payloads=(rogue,)))
    assert "/update_weights_from_tensor" not in fresh.paths()
    # What the check prevents: the same payload posted directly kills the "scheduler".
    raw = {"serialized_named_tensors": [rogue], "load_format": "flattened_bucket"}
    engine.begin_update()
    assert requests.post(fresh.url + "/update_weights_from_tensor", json=raw).status_code == 500
    assert fresh.status()["dead"].startswith("Scheduler hit an exception")
    assert requests.get(fresh.url + "/model_info").status_code == 503


def test_session_gating_errors_carry_the_servers_message(fresh, weights):
    new = weights["seed1"]
    plan = _plan(new)
    engine = _engine(fresh, path="tensor")
    sender = IpcPayloadSender("cpu")
    bucket = plan.buckets[0]
    sender.buffers(bucket)
    ticket = sender.send(bucket, {})
    with pytest.raises(RuntimeError, match=r"HTTP 400: .*between begin_weight_update"):
        engine.update_bucket(bucket, ticket).wait(WAIT_S)
    engine.begin_update()
    with pytest.raises(RuntimeError, match="session is already open"):
        engine.begin_update()
    engine.end_update()
    with pytest.raises(RuntimeError, match="no weight-update session is open"):
        engine.end_update()
    assert fresh.status()["dead"] is None
    assert_bit_exact(fresh.state(), weights["seed0"])


def test_flush_retries_with_backoff_and_surfaces_the_message(fresh):
    engine = _engine(fresh, flush_retries=3, flush_backoff_s=0.05, flush_backoff_max_s=0.1)
    engine.pause("retract")
    fresh.set(busy_flushes=2)
    t0 = time.monotonic()
    assert engine.flush_cache()
    assert time.monotonic() - t0 >= 0.05 + 0.1  # 0.05, then doubled to the 0.1 cap
    assert fresh.paths().count("/flush_cache") == 3

    fresh.set(busy_flushes=10)
    assert not engine.flush_cache()
    assert "refused 4 time(s); last answer: Flush cache failed." in engine.flush_error
    assert fresh.paths().count("/flush_cache") == 3 + 4

    waiting = _engine(fresh, flush_retries=0, flush_wait_s=0.01)  # the server waits, not us
    waiting.pause("retract")
    assert not waiting.flush_cache()
    assert waiting.flush_error.endswith("last answer: Timed out waiting for idle state.")
    assert fresh.log()[-1]["query"] == "timeout=0.01"


def test_pause_modes_and_in_place_skips_flush(fresh, weights):
    engine = _engine(fresh, path="tensor")
    fresh.set(running=2)
    engine.pause("retract")
    assert fresh.status()["waiting"] == 2 and engine.flush_cache()  # retracted: idle enough
    engine.resume()
    assert fresh.status()["running"] == 2
    new = weights["seed1"]
    run_update(engine, _plan(new), new, IpcPayloadSender("cpu"), version="ip", mode="in_place")
    assert fresh.status()["running"] == 2  # in-place requests survive, version stamp included
    assert "/flush_cache" in fresh.paths()[:4]  # only the retract round flushed
    assert fresh.paths().count("/flush_cache") == 1
    assert_bit_exact(fresh.state(), new)
    engine.pause("in_place")
    assert requests.get(fresh.url + "/flush_cache").status_code == 400  # why it is skipped
    with pytest.raises(ValueError, match=r"PauseGenerationReqInput: invalid field.*mode"):
        engine.pause("freeze")


def test_api_key_is_sent(fresh, weights):
    fresh.set(api_key="sekret")
    with pytest.raises(RuntimeError, match="HTTP 401"):
        _engine(fresh).pause("abort")
    new = weights["seed1"]
    engine = _engine(fresh, path="tensor", api_key="sekret")
    run_update(engine, _plan(new), new, IpcPayloadSender("cpu"), version="k")
    log = fresh.log()
    assert log[0]["auth"] is None
    assert {e["auth"] for e in log[1:]} == {"Bearer sekret"}
    assert_bit_exact(fresh.state(), new)
