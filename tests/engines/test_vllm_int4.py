"""A real ``vllm serve`` (CPU build) serving a W4A16 compressed-tensors checkpoint through its
CPU WNA16 kernel, receiving packed int4 updates through the weightsync backend."""

from __future__ import annotations

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
    perturbed,
    plan_for,
    push,
    push_and_report,
    reference_logprobs,
)

pytestmark = pytest.mark.slow

KEY = "ws-int4-key"


def _packed(state, cfg):
    from weightsync.quant import quantize_stream

    return dict(quantize_stream(state.items(), cfg))


def _dequantized(state, packed, cfg):
    """The bf16 weights the engine computes with: every int4 weight unpacked."""
    from weightsync.quant import unpack_int4

    out = {}
    for name, t in state.items():
        base = name.removesuffix(".weight")
        if f"{base}.weight_packed" in packed:
            keys = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
            parts = {k: packed[f"{base}.{k}"] for k in keys if f"{base}.{k}" in packed}
            t = unpack_int4(parts, cfg.group_size, cfg.symmetric).to(t.dtype)
        out[name] = t
    return out


def _checksums(url: str) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {KEY}"}  # every route is guarded
    r = requests.post(
        f"{url}/weight_checker", json={"action": "checksum"}, headers=headers, timeout=TIMEOUT_S
    )
    r.raise_for_status()
    return r.json()["checksums"]


@pytest.fixture(scope="module", params=[True, False], ids=["symmetric", "asymmetric"])
def served(request, tmp_path_factory):
    pytest.importorskip("vllm")
    from weightsync.engines.vllm import VllmEngine, VllmEngineConfig
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig
    from weightsync.quant import Int4Config
    from weightsync.quant.convert import convert_checkpoint

    tmp = tmp_path_factory.mktemp("vllm_int4")
    state = build_tiny_qwen2(tmp / "bf16")
    cfg = Int4Config(group_size=64, symmetric=request.param)
    convert_checkpoint(tmp / "bf16", tmp / "int4", cfg, progress=False)
    server_cfg = VllmServerConfig(
        model_dir=str(tmp / "int4"),
        log_path=str(tmp / "server.log"),
        api_key=KEY,
        extra_args=("--enable-scale-out",),
        startup_timeout_s=4 * TIMEOUT_S,
    )
    with VllmServer(server_cfg) as server:
        engine = VllmEngine(VllmEngineConfig(url=server.url, api_key=KEY, timeout_s=TIMEOUT_S))
        name = f"ws-test-int4-{'sym' if cfg.symmetric else 'asym'}"
        with broadcast_link(engine, name) as sender:
            baseline = [generate(server.url, p, api_key=KEY) for p in PROMPTS]
            yield server, engine, sender, state, cfg, tmp, baseline
        engine.close()


def test_engine_expects_packed_layout(served):
    _, engine, _, state, cfg, _, _ = served
    expected = engine.expected_params()
    q = "model.layers.0.self_attn.q_proj"
    assert expected[f"{q}.weight_packed"] == ("int32", (128, 128 // 8))
    assert expected[f"{q}.weight_scale"] == ("bfloat16", (128, 128 // cfg.group_size))
    assert expected[f"{q}.weight_shape"] == ("int64", (2,))
    assert f"{q}.weight" not in expected
    if not cfg.symmetric:
        # zero points packed along the output dim: [ceil(out / 8), groups]
        assert expected[f"{q}.weight_zero_point"] == ("int32", (128 // 8, 128 // cfg.group_size))
    assert set(expected) == set(_packed(state, cfg))


def test_int4_update_exact_codes_and_restore(served):
    server, engine, sender, state, cfg, tmp, baseline = served
    initial_checksums = _checksums(server.url)
    new_bf16 = perturbed(state, seed=7)
    new = _packed(new_bf16, cfg)
    plan = plan_for(new, bucket_bytes=32 << 10)
    what = f"int4 ({'sym' if cfg.symmetric else 'asym'}) broadcast update (load includes repack)"
    push_and_report(engine, sender, plan, new, "int4-v1", what)

    # The WNA16 kernel computes with exactly the packer's codes and scales (read back).
    assert_kernels_hold(engine, new, int4=cfg)
    got = [generate(server.url, p, api_key=KEY) for p in PROMPTS]
    assert got[0][0] != baseline[0][0]
    for (_, logprobs), prompt in zip(got, PROMPTS, strict=True):
        ref = reference_logprobs(tmp / "bf16", _dequantized(new_bf16, new, cfg), prompt)
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref), atol=0.08, rtol=0.02)

    # The original packed checkpoint restores generations and the engine's repacked state.
    original = _packed(state, cfg)
    push(engine, sender, plan_for(original, 1 << 20), original, version="int4-v0")
    assert [generate(server.url, p, api_key=KEY) for p in PROMPTS] == baseline
    assert _checksums(server.url) == initial_checksums
