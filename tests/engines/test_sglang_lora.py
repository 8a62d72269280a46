"""LoRA adapter-only sync into SGLang (``/load_lora_adapter``, ``/load_lora_adapter_from_tensors``,
``/unload_lora_adapter``), against the protocol server, which parses the bodies with SGLang's
own request structs, reads the adapter directory as SGLang's LoRA loader does, opens each TP
rank's in-memory payload with SGLang's deserializer and checks its sha256s as SGLang's TP worker
does, and answers with its ``LoRAUpdateOutput``.

First the adapter alone: bodies and replies round-trip, each refusal SGLang has comes back
with its message, unloading an unknown name is a no-op, a payload whose bytes are not the ones
announced is refused. Then the whole path: WeightSync publishes a megatron TP=2 trainer's
adapter versions into a TP=2 server, in memory, which holds exactly what the trainer exports;
nothing is written to disk; the last ``keep`` versions stay; a failed load changes nothing.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import requests
import torch

from tests.engines.test_sglang_adapter import WAIT_S, _engine, assert_bit_exact
from tests.engines.test_vllm_lora import RANK, TARGETS, _apply_lora, _set_lora
from tests.sglang_fixture_lora import LoraServing
from tests.sglang_protocol_server import ProtocolServer, tiny_qwen2
from weightsync.lora import ADAPTER_FILE, CONFIG_FILE, write_adapter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("sglang_structs")]
TP = 2


@pytest.fixture(scope="module")
def server():
    srv = ProtocolServer(seed=0, lora=LoraServing(max_lora_rank=RANK))
    yield srv
    srv.stop()


@pytest.fixture
def fresh(server):
    server.reset()
    return server


def _random_adapter(seed: int, r: int = RANK) -> dict[str, torch.Tensor]:
    """A PEFT adapter on every TARGETS projection of the server's model (tiny_qwen2(0))."""
    g = torch.Generator().manual_seed(seed)
    adapter = {}
    for name, w in tiny_qwen2(seed=0).state_dict().items():
        module = name.removesuffix(".weight")
        if module.rpartition(".")[2] in TARGETS:
            prefix = f"base_model.model.{module}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(r, w.shape[1], generator=g)
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(w.shape[0], r, generator=g)
    return adapter


def _write(path: Path, tensors: dict[str, torch.Tensor], r: int = RANK, **config) -> str:
    peft = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": list(TARGETS)}
    write_adapter(path, tensors, {**peft, **config})
    return str(path)


def test_load_and_unload_round_trip_with_sglangs_structs(fresh, tmp_path):
    engine = _engine(fresh)
    adapters = {f"policy@v{v}": _random_adapter(seed=v) for v in (1, 2)}
    paths = {name: _write(tmp_path / name, t) for name, t in adapters.items()}
    for name, path in paths.items():
        engine.load_adapter(name, path)
    assert fresh.loras() == paths
    for name, tensors in adapters.items():
        assert_bit_exact(fresh.lora(name), tensors)
    engine.unload_adapter("policy@v1")
    assert fresh.loras() == {"policy@v2": paths["policy@v2"]}
    engine.unload_adapter("policy@v1")  # not loaded (any more): a no-op, as ControlPlane says
    bodies = [(e["path"], e["body"]) for e in fresh.log()]
    load_v1 = {"lora_name": "policy@v1", "lora_path": paths["policy@v1"]}
    assert bodies[0] == ("/load_lora_adapter", load_v1)
    assert bodies[2] == ("/unload_lora_adapter", {"lora_name": "policy@v1"})


def test_from_tensors_every_rank_opens_its_own_payload_and_checks_its_bytes(fresh, monkeypatch):
    import weightsync.engines.sglang as sglang_adapter

    engine = _engine(fresh)
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": list(TARGETS)}
    adapter = _random_adapter(seed=7)
    engine.load_adapter_tensors("policy@v1", adapter, config)
    assert fresh.loras() == {"policy@v1": "__tensor__"}
    assert_bit_exact(fresh.lora("policy@v1"), adapter)
    body = fresh.log()[-1]["body"]
    assert fresh.log()[-1]["path"] == "/load_lora_adapter_from_tensors"
    assert body["load_format"] == "flattened_bucket" and set(body["expected_checksums"]) == set(
        adapter
    )
    # Bytes that are not the ones announced: every rank refuses, with SGLang's message.
    monkeypatch.setattr(sglang_adapter, "sha256", lambda t: "0" * 64)
    with pytest.raises(RuntimeError, match=r"HTTP 400: \[LORA-CHECK\] rank0 adapter sync MISMATCH"):
        engine.load_adapter_tensors("policy@v2", _random_adapter(seed=8), config)
    assert list(fresh.loras()) == ["policy@v1"]


def test_replies_are_sglangs_lora_update_output(fresh, tmp_path):
    path = _write(tmp_path / "a", _random_adapter(seed=3))
    load, unload = f"{fresh.url}/load_lora_adapter", f"{fresh.url}/unload_lora_adapter"
    ok = requests.post(load, json={"lora_name": "a", "lora_path": path}, timeout=WAIT_S)
    assert (ok.status_code, ok.json()) == (
        200,
        {
            "rid": None,
            "http_worker_ipc": None,
            "success": True,
            "error_message": "",
            "loaded_adapters": {"a": path},
        },
    )
    again = requests.post(load, json={"lora_name": "a", "lora_path": path}, timeout=WAIT_S)
    assert again.status_code == 400 and again.json()["loaded_adapters"] == {"a": path}
    unknown = requests.post(unload, json={"lora_name": "b"}, timeout=WAIT_S)
    assert unknown.status_code == 400 and unknown.json()["loaded_adapters"] is None
    assert unknown.json()["error_message"] == (
        "LoRA with name b does not exist. Loaded LoRAs: dict_keys(['a'])"
    )
    no_path = requests.post(load, json={"lora_name": "c"}, timeout=WAIT_S)
    assert no_path.status_code == 422  # FastAPI's answer to a body the struct refuses


def _bad_adapter(path: Path, r=RANK, drop=None, transpose=False, **config) -> str:
    tensors = _random_adapter(seed=5, r=r)
    if transpose:  # one lora_A as [in, r]: a mix-up of PEFT's [r, in]
        name = next(n for n in tensors if ".lora_A." in n)
        tensors[name] = tensors[name].t().contiguous()
    _write(path, tensors, r=r, **config)
    if drop:
        (path / drop).unlink()
    return str(path)


# (what is wrong, _bad_adapter's arguments, SGLang's message)
REFUSALS = [
    ("already loaded", {}, "because it is already loaded"),
    ("no config", {"drop": CONFIG_FILE}, r"No such file.*adapter_config\.json"),
    ("no weights", {"drop": ADAPTER_FILE}, "Cannot find any model weights"),
    ("rank above max", {"r": RANK * 2}, f"with rank {RANK * 2} is incompatible"),
    ("unserved module", {"target_modules": ["q_proj", "lm_head"]}, "is incompatible"),
    ("DoRA", {"use_dora": True}, "doesn't support DoRA adapters"),
    ("misshapen", {"transpose": True}, r"fixture: .*lora_A\.weight has shape \(64, 8\)"),
]


@pytest.mark.parametrize(("case", "bad", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_come_back_with_sglangs_message(fresh, tmp_path, case, bad, message):
    engine = _engine(fresh)
    engine.load_adapter("old", _write(tmp_path / "old", _random_adapter(seed=4)))
    name = "old" if case == "already loaded" else "new"
    with pytest.raises(RuntimeError, match=rf"/load_lora_adapter: HTTP 400: .*{message}"):
        engine.load_adapter(name, _bad_adapter(tmp_path / "new", **bad))
    assert list(fresh.loras()) == ["old"]


def test_a_server_without_lora_says_so(fresh, tmp_path):
    fresh.set(enable_lora=False)  # as if launched without --enable-lora
    engine = _engine(fresh)
    not_enabled = r"HTTP 400: LoRA is not enabled\. Please set `--enable-lora`"
    with pytest.raises(RuntimeError, match=not_enabled):
        engine.load_adapter("a", _write(tmp_path / "a", _random_adapter(seed=6)))
    with pytest.raises(RuntimeError, match=not_enabled):
        engine.unload_adapter("a")


# --- the whole path: a megatron TP=2 trainer -> WeightSync -> a TP=2 server ----------------
def _export_lora(worker) -> dict | None:
    import megatron_bridge

    named = megatron_bridge.export_lora(worker.model_chunks, worker.hf_config, worker.lora_spec)
    return {n: t.detach().clone() for n, t in named} or None


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """The trainer group with LoRA, a TP=2 server launched from its export, WeightSync."""
    from safetensors.torch import save_file

    from tests.engines.test_engine_matrix import _export
    from weightsync import EngineSpec, LoraSync, SyncConfig, WeightSync
    from weightsync.ray_group import TrainerGroup
    from weightsync_demo.policy import PolicyWorker, as_hf_dict

    hf = tiny_qwen2(seed=3)
    root = Path(f"/dev/shm/wsync-sglang-lora-{uuid.uuid4().hex[:8]}")
    group = TrainerGroup.create(2, tp=2, seed=0, worker_cls=PolicyWorker, timeout_s=WAIT_S * 2)
    srv = ws = None
    try:
        weights = {n: t.to(torch.bfloat16) for n, t in hf.state_dict().items()}
        config = as_hf_dict(hf.config)
        group.run_all(PolicyWorker.build_policy, weights, config, 0.0, None, 2, timeout_s=WAIT_S)
        checkpoint = tmp_path_factory.mktemp("sglang-lora") / "model.safetensors"
        save_file(next(s for s in group.run_all(_export, timeout_s=WAIT_S) if s), checkpoint)
        group.run_all(_apply_lora, timeout_s=WAIT_S)
        serving = LoraServing(max_lora_rank=RANK)
        srv = ProtocolServer(tp_size=TP, checkpoint=str(checkpoint), lora=serving)
        spec = EngineSpec(kind="sglang", url=srv.url, name="sg-tp2", tp_size=TP)
        ws = WeightSync(group, [spec], SyncConfig(lora=LoraSync(root=str(root))))
        yield group, srv, ws, root
    finally:
        if ws is not None:
            ws.close()
        if srv is not None:
            srv.stop()
        group.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def _publish(group, ws, version: int, seed: int):
    group.run_all(_set_lora, seed, timeout_s=WAIT_S)
    return ws.update_adapter(version)


def test_the_server_holds_the_trainers_adapter_and_the_last_two_versions(rig):
    group, srv, ws, root = rig
    for version in (1, 2):
        stats = _publish(group, ws, version, seed=40 + version)
        assert ws.adapter == stats.adapter == f"policy@v{version}" and not stats.unloaded
        exported = next(s for s in group.run_all(_export_lora, timeout_s=WAIT_S) if s)
        assert_bit_exact(srv.lora(ws.adapter), exported)
    # In memory: SGLang registers it as "__tensor__", and nothing was written for it.
    assert stats.path is None and not list(root.rglob("*"))
    assert srv.loras() == {f"policy@v{v}": "__tensor__" for v in (1, 2)}
    first = next(iter(exported))
    assert not torch.equal(srv.lora("policy@v1")[first], exported[first])  # two adapters
    stats = _publish(group, ws, 3, seed=43)
    assert stats.unloaded == ["policy@v1"]  # keep=2
    assert set(srv.loras()) == {"policy@v2", "policy@v3"}
    loads = [e for e in srv.log() if "lora" in e["path"]]
    assert {e["path"] for e in loads} == {
        "/load_lora_adapter_from_tensors",
        "/unload_lora_adapter",
    }


@pytest.mark.parametrize(
    ("fault", "version", "message"),
    [
        ({"refuse_lora": True}, 10, "refused to load"),
        ({"max_lora_rank": RANK // 2}, 20, f"with rank {RANK} is incompatible"),
    ],
    ids=["refused", "rank-too-high"],
)
def test_a_failed_load_leaves_the_previous_adapter_in_place(rig, fault, version, message):
    from weightsync import UpdateFailed

    group, srv, ws, _ = rig
    _publish(group, ws, version, seed=version)
    loaded = srv.loras()
    srv.set(**fault)
    try:
        failed = pytest.raises(UpdateFailed, match=rf"policy@v{version + 1} not loaded.*{message}")
        with failed:
            _publish(group, ws, version + 1, seed=version + 1)
    finally:
        srv.set(refuse_lora=False, max_lora_rank=RANK)
    assert ws.adapter == f"policy@v{version}" and srv.loras() == loaded
