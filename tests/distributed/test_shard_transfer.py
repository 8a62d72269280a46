"""Sharded transfer with real megatron trainer ranks: every engine rank (a receiving process
here; the vLLM half comes with the engine integration) assembles exactly its own slice of
every tensor from the trainer ranks' own shards, equal to that slice of the gathered export,
and receives no byte more than it serves."""

from __future__ import annotations

import pytest
import torch

from tests.shard_jobs import run_transfer
from weightsync.engine_shards import EngineLayout
from weightsync.quant.config import Int4Config
from weightsync.quant.stream import quantize_stream

SYM8, ASYM8 = Int4Config(group_size=8), Int4Config(group_size=8, symmetric=False)
CASES = {
    "llama-tp2-to-tp1-and-tp2": ("llama", dict(world=2, tp=2), [EngineLayout(1), EngineLayout(2)]),
    "llama-tp1-dp2-to-tp2": ("llama", dict(world=2, tp=1), [EngineLayout(2)]),
    "qwen3-tied-pp2-to-tp2": ("qwen3", dict(world=2, pp=2), [EngineLayout(2)]),
    "qwen2_moe-ep2-to-tp2-ep": (
        "qwen2_moe",
        dict(world=4, tp=2, ep=2),
        [EngineLayout(2, expert_parallel=True)],
    ),
    "deepseek_v3-etp2-to-tp2": ("deepseek_v3", dict(world=2, tp=2, etp=2), [EngineLayout(2)]),
    # int4: each trainer rank quantizes its own slice (row-parallel cuts on group boundaries)
    "llama-int4-tp2-to-tp2": ("llama", dict(world=2, tp=2), [EngineLayout(2)], SYM8),
    "llama-int4-asym-tp1-to-tp1": ("llama", dict(world=1), [EngineLayout(1)], ASYM8),
    "qwen2_moe-int4-ep2-to-tp1": ("qwen2_moe", dict(world=2, ep=2), [EngineLayout(1)], SYM8),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_engine_rank_gets_exactly_its_slices(case: str) -> None:
    family, sizes, engines, *int4 = CASES[case]
    int4 = int4[0] if int4 else None
    sizes = dict(dict(tp=1, pp=1, ep=1, etp=1) | sizes)
    if sizes["etp"] == 1 and sizes["ep"] == 1:
        sizes["etp"] = sizes["tp"]  # megatron's default: experts cut like the dense layers
    results = run_transfer(family, sizes, engines, int4)
    world = sizes["world"]
    full = _engine_tensors(results[0]["full"], int4)
    for r in results[:world]:
        assert r["agree"], "the live holdings differ from the configs-only plan"
        assert r["sent"] == r["planned"], (r["sent"], r["planned"])
    for r in results[world:]:
        assert set(r["slices"]) and r["received"] == r["served"], (r["received"], r["served"])
        for name, got in r["slices"].items():
            box = r["boxes"][name]
            want = full[name][tuple(slice(lo, hi) for lo, hi in box)]
            assert torch.equal(got, want), (r["engine"], r["worker"], name, box)
    received = sum(r["received"] for r in results[world:])
    assert sum(r["sent"] for r in results[:world]) == received


def _engine_tensors(full: dict, int4: Int4Config | None) -> dict:
    """The whole model as the engine loads it: int4-packed by the whole-tensor packer, so a
    slice quantized on a trainer shard must equal the slice of the whole's codes and scales."""
    return dict(quantize_stream(full.items(), int4))
