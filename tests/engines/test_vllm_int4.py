"""A real ``vllm serve`` (CPU build) serving a W4A16 compressed-tensors checkpoint through its
CPU WNA16 kernel, receiving packed int4 updates through the weightsync backend."""

from __future__ import annotations

import pytest
import torch

from tests.vllm_helpers import (
    PROMPTS,
    TIMEOUT_S,
    assert_kernels_hold,
    broadcast_link,
    build_tiny_qwen2,
    generate,
    model_logprobs,
    perturbed,
    plan_for,
    push,
    push_and_report,
    reference_model,
    weight_checksums,
)

pytestmark = pytest.mark.slow

KEY = "ws-int4-key"


def _packed(state, cfg):
    from weightsync.quant import quantize_stream

    return dict(quantize_stream(state.items(), cfg))


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
        extra_env={"WEIGHTSYNC_FAULT_INJECTION": "1"},
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
    initial_checksums = weight_checksums(server.url, KEY)
    new_bf16 = perturbed(state, seed=7)
    new = _packed(new_bf16, cfg)
    plan = plan_for(new, bucket_bytes=32 << 10)
    what = f"int4 ({'sym' if cfg.symmetric else 'asym'}) broadcast update (load includes repack)"
    push_and_report(engine, sender, plan, new, "int4-v1", what)

    # The WNA16 kernel computes with exactly the packer's codes and scales (read back).
    assert_kernels_hold(engine, new, int4=cfg)
    got = [generate(server.url, p, api_key=KEY) for p in PROMPTS]
    assert got[0][0] != baseline[0][0]
    # transformers on the packed update, decompressed by compressed-tensors (the oracle).
    reference = reference_model(tmp / "int4", new)
    for (_, logprobs), prompt in zip(got, PROMPTS, strict=True):
        ref = model_logprobs(reference, prompt)
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref), atol=0.08, rtol=0.02)

    # The original packed checkpoint restores generations and the engine's repacked state.
    original = _packed(state, cfg)
    push(engine, sender, plan_for(original, 1 << 20), original, version="int4-v0")
    assert [generate(server.url, p, api_key=KEY) for p in PROMPTS] == baseline
    assert weight_checksums(server.url, KEY) == initial_checksums


def test_one_wrong_int4_scale_full_always_sample_where_its_code_is_not_zero(served):
    """One int4 scale changed on its way into the engine (one row of one group): ``full``
    reads every element and catches it; ``sample`` reads one column of that group, which
    shows it unless the codes of that group's probed columns are the zero point (0 whatever
    the scale)."""
    import json

    from weightsync.probe import INT4_PARTS, int4_columns
    from weightsync.proof import Probe, checkpoint_fingerprints

    _, engine, sender, state, cfg, _, _ = served
    new = _packed(perturbed(state, seed=11), cfg)
    module, row, group = "model.layers.0.mlp.down_proj", 2, 1
    spot = {"name": f"{module}.weight_scale", "rows": [row, row + 1], "cols": [group, group + 1]}
    engine._rpc_all("fault:" + json.dumps({"corrupt": [spot]}))
    push(engine, sender, plan_for(new, 1 << 20), new, version="int4-bad-scale")
    with pytest.raises(AssertionError, match=f"1 weights differ.*{module}.weight"):
        assert_kernels_hold(engine, new, int4=cfg)
    parts = {p: new[f"{module}.{p}"] for p in INT4_PARTS if f"{module}.{p}" in new}
    width = int(parts["weight_shape"][-1])
    for seed in range(4):
        probe = Probe(seed=seed, group=cfg.group_size)
        cols = probe.columns(f"{module}.weight", width)
        probed = torch.tensor([c for c in cols.tolist() if c // cfg.group_size == group])
        values = int4_columns(parts, probed, cfg.group_size, cfg.symmetric)[row]
        shows = (values != 0).any()  # a zero-point code reads 0 whatever the scale
        want = checkpoint_fingerprints(new, probe, cfg.group_size, cfg.symmetric)
        live = engine.live_digests(probe)
        assert (live[f"{module}.weight"] != want[f"{module}.weight"]) == bool(shows), seed
        assert all(live[n] == d for n, d in want.items() if n != f"{module}.weight")
    push(engine, sender, plan_for(new, 1 << 20), new, version="int4-fixed")
    assert_kernels_hold(engine, new, int4=cfg)
