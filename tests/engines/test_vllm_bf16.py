"""A real ``vllm serve`` (CPU build) receiving bf16 weight updates through the weightsync backend.

One server for the whole module (a start costs ~30 s on 2 cores); every test leaves it serving
the original checkpoint weights.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import requests
import torch

from tests.vllm_helpers import (
    PROMPTS,
    TIMEOUT_S,
    assert_kernels_hold,
    broadcast_link,
    build_tiny_qwen2,
    generate,
    join_ring,
    ordered,
    perturbed,
    plan_for,
    push,
    push_and_report,
    reference_logprobs,
    weight_checksums,
)
from weightsync.plan import fill_bucket
from weightsync.transport.base import Ticket

pytestmark = pytest.mark.slow
API_KEY = "ws-test-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("vllm")
    from weightsync.engines.vllm import VllmEngine, VllmEngineConfig
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig

    tmp = tmp_path_factory.mktemp("vllm_bf16")
    state = build_tiny_qwen2(tmp / "model")
    cfg = VllmServerConfig(
        model_dir=str(tmp / "model"),
        log_path=str(tmp / "server.log"),
        api_key=API_KEY,
        max_model_len=2048,
        extra_args=("--enable-scale-out",),
        startup_timeout_s=4 * TIMEOUT_S,
    )
    with VllmServer(cfg) as server:
        engine = VllmEngine(VllmEngineConfig(url=server.url, api_key=API_KEY, timeout_s=TIMEOUT_S))
        baseline = {p_i: generate(server.url, p, api_key=API_KEY) for p_i, p in enumerate(PROMPTS)}
        yield server, engine, state, baseline, tmp / "model"
        engine.close()
        pid = server.pid
    # A clean stop takes the whole process group (API server, engine core, worker) with it.
    assert not server.alive() and not engine.health()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def _outputs(server):
    return {i: generate(server.url, p, api_key=API_KEY) for i, p in enumerate(PROMPTS)}


def _checksums(server) -> dict[str, str]:
    return weight_checksums(server.url, API_KEY)


def test_launcher_serves_with_api_key(served):
    server, engine, _, baseline, _ = served
    assert server.alive() and engine.health()
    r = requests.post(
        f"{server.url}/inference/v1/generate", json={"token_ids": [1, 2]}, timeout=TIMEOUT_S
    )
    assert r.status_code == 401
    tokens, logprobs = baseline[0]
    assert len(tokens) == 8 and len(logprobs) == len(PROMPTS[0]) - 1


def test_engine_errors_come_back_with_their_text(served):
    _, engine, state, *_ = served
    plan = plan_for(state, 1 << 20)
    # /update_weights outside start/finish: vLLM refuses, and the adapter says why.
    pending = engine.update_bucket(plan.buckets[0], Ticket(0, 0))
    with pytest.raises(RuntimeError, match="start_weight_update"):
        pending.wait(TIMEOUT_S)
    assert not engine.is_paused()


def test_expected_params_are_the_checkpoint(served):
    _, engine, state, _, _ = served
    expected = engine.expected_params()
    assert expected == {n: ("bfloat16", tuple(t.shape)) for n, t in state.items()}


@pytest.fixture(scope="module")
def broadcast_sender(served):
    # Its tests come first in the file: the shm tests later point the engine at a ring.
    with broadcast_link(served[1], "ws-test-bf16") as sender:
        yield sender


def test_broadcast_update_is_exact_and_matches_transformers(served, broadcast_sender):
    server, engine, state, baseline, model_dir = served
    new = perturbed(state, seed=1)
    # Per-tensor units and small buckets: q, k and v of one layer arrive in three buckets, so
    # the layer outlives the receive slot its q came in.
    plan = plan_for(new, bucket_bytes=20 << 10, fused=False)
    assert len(plan.buckets) > 8
    push_and_report(engine, broadcast_sender, plan, new, "bf16-v1", "bf16 broadcast update")

    assert engine.get_version() == "bf16-v1"
    assert_kernels_hold(engine, new)
    got = _outputs(server)
    assert got[0][0] != baseline[0][0], "new weights must change greedy generations"
    for i, prompt in enumerate(PROMPTS):
        ref = reference_logprobs(model_dir, new, prompt)
        torch.testing.assert_close(torch.tensor(got[i][1]), torch.tensor(ref), atol=0.06, rtol=0.02)

    # Restoring the original weights restores generations token for token.
    push(engine, broadcast_sender, plan_for(state, 1 << 20), state, version="bf16-v0")
    assert _outputs(server) == baseline


def _stream(url: str, prompt: list[int], n: int, started: threading.Event, out: list) -> None:
    """Greedy streaming generation; sets ``started`` once the first tokens arrived."""
    body = {
        "token_ids": prompt,
        "stream": True,
        "sampling_params": {"max_tokens": n, "temperature": 0.0, "ignore_eos": True},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{url}/inference/v1/generate"
    with requests.post(url, json=body, headers=headers, stream=True, timeout=TIMEOUT_S) as r:
        r.raise_for_status()
        for line in r.iter_lines(chunk_size=None):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.extend(json.loads(line[6:])["choices"][0]["token_ids"])
                started.set()


@pytest.mark.parametrize(
    ("mode", "kv_cache"),
    [("retract", "recompute"), ("in_place", "recompute"), ("in_place", "reuse")],
)
def test_inflight_request_survives_the_update(served, broadcast_sender, mode, kv_cache):
    server, engine, state, _, _ = served
    flush = kv_cache == "recompute"
    prompt, n = PROMPTS[1], 2000
    new = perturbed(state, seed=5)
    old = generate(server.url, prompt, n, API_KEY, ignore_eos=True)[0]
    plan = plan_for(new, 1 << 20)
    # A request that finished before the pause took effect proves nothing: try again.
    for _ in range(3):
        started, tokens = threading.Event(), []
        worker = threading.Thread(target=_stream, args=(server.url, prompt, n, started, tokens))
        worker.start()
        assert started.wait(timeout=TIMEOUT_S)
        engine.pause(mode)
        if not worker.is_alive():  # done before the pause (a loaded machine): nothing to see
            engine.resume()
            continue
        push(engine, broadcast_sender, plan, new, f"bf16-{mode}", mode, flush=flush, paused=True)
        worker.join(timeout=TIMEOUT_S)
        fresh = generate(server.url, prompt, n, API_KEY, ignore_eos=True)[0]
        # First token the new weights chose (those before it may come from either).
        j = next((i for i, (a, b) in enumerate(zip(tokens, old, strict=False)) if a != b), n)
        resumed = generate(server.url, prompt + tokens[:j], 4, API_KEY, ignore_eos=True)[0]
        push(engine, broadcast_sender, plan_for(state, 1 << 20), state, version="bf16-v0")
        if tokens != old:
            break
    # Frozen, not aborted: the request completes in full, its head from the old weights and
    # its tail from the new ones.
    assert len(tokens) == n
    assert tokens not in (old, fresh)
    assert tokens[0] == old[0]
    if flush:
        # Its KV was dropped in the pause (retracted, or in place with kv_cache="recompute")
        # and recomputed with the new weights, so it continues exactly like a fresh request
        # for the same prefix.
        assert tokens[j : j + 4] == resumed


def _first_token(url: str, prompt: list[int]) -> tuple[int, float]:
    """The greedy next token and its logprob; the prompt may come from the prefix cache
    (no prompt logprobs asked: vLLM would skip the cache for them)."""
    body = {
        "token_ids": prompt,
        "sampling_params": {"max_tokens": 1, "temperature": 0.0, "logprobs": 0},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = requests.post(f"{url}/inference/v1/generate", json=body, headers=headers, timeout=TIMEOUT_S)
    r.raise_for_status()
    entry = r.json()["choices"][0]["logprobs"]["content"][0]
    return entry["token_id"], entry["logprob"]


@pytest.mark.parametrize("kv_cache", ["recompute", "reuse"])
def test_a_cached_prefix_is_not_reused_across_versions_unless_asked(
    served, broadcast_sender, kv_cache
):
    server, engine, state, _, model_dir = served
    # Longer than a KV block, so its head is cached by the first request.
    prompt = [(7 * i + 3) % 250 + 1 for i in range(300)]
    new = perturbed(state, seed=11, scale=1.0)
    _first_token(server.url, prompt)  # cached under the old weights
    plan = plan_for(new, 1 << 20)
    flush = kv_cache != "reuse"
    push(engine, broadcast_sender, plan, new, "kv", mode="in_place", flush=flush)
    token, got = _first_token(server.url, prompt)
    push(engine, broadcast_sender, plan_for(state, 1 << 20), state, version="bf16-v0")
    want = reference_logprobs(model_dir, new, [*prompt, token])[-1]
    if flush:  # computed from scratch under the new weights
        assert abs(got - want) < 0.06
    else:  # the old weights' KV of the cached head was reused: the hazard is real
        assert abs(got - want) > 0.5  # (measured: 0.01 recomputed, 2.9 reused)


def test_shm_update_then_restore(served):
    from weightsync.transport.shm import ShmRing, ShmSender

    server, engine, state, baseline, _ = served
    initial_checksums = _checksums(server)
    updates = [perturbed(state, seed=2), perturbed(state, seed=3, scale=0.8)]
    plans = [plan_for(u, bucket_bytes=96 << 10) for u in updates]
    ring = ShmRing.create(max(p.max_bucket_nbytes for p in plans), num_slots=2)
    join_ring(engine, ring)
    sender = ShmSender(ring, timeout_s=TIMEOUT_S)
    try:
        outputs = []
        for i, (new, plan) in enumerate(zip(updates, plans, strict=True)):
            push_and_report(engine, sender, plan, new, f"bf16-shm-{i}", "bf16 shm update")
            assert_kernels_hold(engine, new)
            outputs.append(_outputs(server))
        assert outputs[0] != outputs[1] != baseline
        push(engine, sender, plans[0], updates[0], version="bf16-shm-again")
        assert _outputs(server) == outputs[0]
        # Restoring the checkpoint restores generations, and vLLM's own weight checker sees
        # the engine-side tensors (repacked linears hash as empty on CPU) exactly as loaded
        # from disk.
        push(engine, sender, plan_for(state, 96 << 10), state, version="bf16-v0")
        assert _outputs(server) == baseline
        assert _checksums(server) == initial_checksums
    finally:
        sender.close()


def test_update_after_one_that_died_midway(served):
    from weightsync.transport.shm import ShmRing, ShmSender

    server, engine, state, baseline, _ = served
    new = perturbed(state, seed=9)
    plan = plan_for(new, 96 << 10)
    ring = ShmRing.create(plan.max_bucket_nbytes, num_slots=2)
    join_ring(engine, ring)
    sender = ShmSender(ring, timeout_s=TIMEOUT_S)
    try:
        engine.validate(plan)
        engine.pause("abort")
        engine.begin_update()
        # The trainer sends two buckets and dies; the driver (WeightSync) aborts the session and
        # resumes the engine (stale). Without the abort, layers still on the meta device
        # would kill vLLM's EngineCore at the first request.
        stream = iter(ordered(new, plan))
        for bucket in plan.buckets[:2]:
            bufs = sender.buffers(bucket)
            fill_bucket(bucket, bufs, [next(stream) for _ in range(bucket.num_tensors)])
            engine.update_bucket(bucket, sender.send(bucket, bufs)).wait(TIMEOUT_S)
        engine.abort_update()
        engine.resume()
        half = _outputs(server)
        assert half != baseline and all(len(tokens) == 8 for tokens, _ in half.values())
        # The next full update goes through and the engine serves exactly its weights.
        push(engine, sender, plan_for(state, 96 << 10), state, version="bf16-v0")
        assert_kernels_hold(engine, state)
        assert _outputs(server) == baseline
    finally:
        sender.close()


def test_a_failed_bucket_leaves_an_engine_that_serves(served):
    server, engine, state, baseline, _ = served
    plan = plan_for(state, 1 << 20)
    engine.shutdown_transport()  # the bucket will fail inside vLLM's worker
    engine.pause("abort")
    try:
        engine.begin_update()
        with pytest.raises(RuntimeError, match="init_weight_transfer_engine was not called"):
            engine.update_bucket(plan.buckets[0], Ticket(0, 0)).wait(TIMEOUT_S)
        engine.abort_update()  # already aborted by the backend itself: a no-op
    finally:
        engine.resume()
    assert _outputs(server) == baseline  # nothing was loaded: every layer kept its weights
    engine.begin_update()  # and no session was left open
    engine.abort_update()


def _bad_updates(state):
    q = "model.layers.0.self_attn.q_proj.weight"
    unknown = dict(state, **{"model.layers.0.self_attn.bogus.weight": state[q]})
    shape = dict(state, **{q: state[q][:, :64].contiguous()})
    dtype = dict(state, **{q: state[q].float()})
    nan = dict(state)
    nan[q] = state[q].clone()
    nan[q][3, 5] = float("nan")
    missing = {n: t for n, t in state.items() if n != q}
    return [
        (unknown, "model.layers.0.self_attn.bogus.weight", "unknown"),
        (shape, q, r"\[128, 64\]"),
        (dtype, q, "float32"),
        (nan, q, "NaN"),
        (missing, q, "missing"),
    ]


def test_bad_input_fails_before_pause_and_keeps_serving(served):
    server, engine, state, baseline, _ = served

    class NeverSend:
        """A sender that must not be reached: validation comes first."""

        def buffers(self, bucket):
            raise AssertionError("bytes were about to be sent for an invalid update")

    for named, tensor, why in _bad_updates(state):
        plan = plan_for(named, 1 << 20, fused=False)
        with pytest.raises(ValueError, match=why) as err:
            push(engine, NeverSend(), plan, named, version="bad")
        assert tensor in str(err.value)
        assert not engine.is_paused()
    assert engine.get_version() != "bad"
    assert _outputs(server) == baseline


_FUZZ = [
    # (route, body): malformed input for everything weightsync adds to the server
    ("/init_weight_transfer_engine", {"init_info": {"transport": 5}}),
    (
        "/init_weight_transfer_engine",
        {"init_info": {"transport": "shm", "slot_names": ["../../etc/passwd"], "slot_bytes": 4096}},
    ),
    (
        "/init_weight_transfer_engine",
        {
            "init_info": {
                "transport": "shm",
                "slot_names": ["wsync-0123abcd-1-0123456789ab-0"],
                "slot_bytes": 1 << 60,
            }
        },
    ),
    (
        "/init_weight_transfer_engine",
        {
            "init_info": {
                "transport": "broadcast",
                "master_address": "127.0.0.1",
                "master_port": -1,
                "world_size": 2,
                "group_name": "g",
            }
        },
    ),
    ("/init_weight_transfer_engine", {"init_info": "not a dict"}),
    ("/update_weights", {"update_info": {"groups": "x"}}),
    ("/update_weights", {"update_info": {"groups": [{"dtype": "evil", "numel": -1}]}}),
    ("/update_weights", {"update_info": {"groups": [], "nbytes": 1 << 62}}),
    (
        "/collective_rpc",
        {"method": "weight_transfer_engine", "args": ["proof:sample:0:99999999999999999999999"]},
    ),
    (
        "/collective_rpc",
        {"method": "weight_transfer_engine", "args": ['fault:{"skip": ["model."]}']},
    ),
    ("/collective_rpc", {"method": "weight_transfer_engine", "args": ["fault:{truncated"]}),
    ("/collective_rpc", {"method": "weight_transfer_engine", "args": ["x" * 100_000]}),
    ("/collective_rpc", {"method": "weight_transfer_engine", "args": [{"not": "a string"}]}),
]


def test_malformed_bodies_to_every_weightsync_route_leave_the_weights_alone(served):
    server, engine, _, baseline, _ = served
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    answers = []
    for route, body in _FUZZ:
        r = requests.post(server.url + route, json=body, headers=headers, timeout=TIMEOUT_S)
        # A weightsync query never raises (it would desynchronise a TP>1 engine's RPC
        # answers): each rank answers {"error"}, which the adapter turns into RuntimeError.
        refused = r.status_code == 200 and route == "/collective_rpc"
        refused = refused and all(set(a) == {"error"} for a in r.json()["results"])
        answers.append((route, 400 if refused else r.status_code))
    # Truncated JSON and a slow client (headers, then nothing) on the same routes.
    r = requests.post(
        server.url + "/update_weights", data=b'{"update_info": {"gro', headers=headers, timeout=60
    )
    answers.append(("truncated", r.status_code))
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
        slow.sendall(
            b"POST /init_weight_transfer_engine HTTP/1.1\r\nHost: x\r\nContent-Length: 999\r\n\r\n{"
        )
        assert engine.health()  # a stalled client holds no one else up
    assert all(code >= 400 for _, code in answers), answers  # every one refused
    assert engine.health() and not engine.is_paused()
    assert _outputs(server) == baseline  # and the weights it serves are untouched
