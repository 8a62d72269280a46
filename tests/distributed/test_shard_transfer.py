"""Sharded transfer with real megatron trainer ranks: every engine rank (a receiving process
here; the vLLM half comes with the engine integration) assembles exactly its own slice of
every tensor from the trainer ranks' own shards, equal to that slice of the gathered export,
and receives no byte more than it serves."""

from __future__ import annotations

import pytest
import torch

from tests.shard_jobs import run_transfer
from weightsync.engine_shards import EngineLayout

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
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_engine_rank_gets_exactly_its_slices(case: str) -> None:
    family, sizes, engines = CASES[case]
    sizes = dict(dict(tp=1, pp=1, ep=1, etp=1) | sizes)
    if sizes["etp"] == 1 and sizes["ep"] == 1:
        sizes["etp"] = sizes["tp"]  # megatron's default: experts cut like the dense layers
    results = run_transfer(family, sizes, engines)
    world = sizes["world"]
    full = results[0]["full"]
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
