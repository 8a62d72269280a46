"""megatron_bridge on CUDA with NCCL: same checks as the CPU tests, one rank per GPU.

Runs only where a GPU is lent (``-m gpu``); megatron-core runs there without the CPU patches.
"""

from __future__ import annotations

import pytest
import torch

from tests.bridge_helpers import run_ranks
from tests.bridge_jobs import Case, run_cases
from tests.distributed.test_bridge_export import check_case, reference_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gpu_export_matches_transformers(tmp_path) -> None:
    world = min(2, torch.cuda.device_count())
    cases = [Case(f, tp=world) for f in ("llama", "qwen2", "qwen3_moe", "deepseek_v3")]
    cases.append(Case("deepseek_v3", tp=world, bf16=True))
    checkpoints = {}
    for case in cases:
        if case.checkpoint not in checkpoints:
            path = str(tmp_path / case.checkpoint)
            checkpoints[case.checkpoint] = {
                "dir": path,
                "weights": reference_checkpoint(case, path),
            }
    dirs = {k: v["dir"] for k, v in checkpoints.items()}
    results = run_ranks(run_cases, world, cases, dirs, backend="nccl", timeout=400)[0]
    for case in cases:
        check_case(results[str(case)], checkpoints, case)
