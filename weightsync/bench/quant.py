"""int4 quantize+pack vs compressed-tensors and memcpy: ``benchmarks/quant_bench.py``'s
measurements, returned as data (GiB/s of bf16 input and the ratios the project tracks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "quant_bench.py"


def _quant_bench():
    if not _PATH.exists():
        raise FileNotFoundError(f"{_PATH}: the int4 section needs the repository's benchmarks/")
    spec = importlib.util.spec_from_file_location("weightsync_quant_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gib(w: torch.Tensor) -> float:
    return w.numel() * w.element_size() / 2**30


def cpu(w: torch.Tensor, reps: int) -> dict:
    seconds = _quant_bench().bench_cpu("linear", w, reps)
    gib = _gib(w)
    return {
        "shape": list(w.shape),
        "median_s": seconds,
        "gib_per_s": {k: gib / s for k, s in seconds.items()},
        "ours_over_compressed_tensors": seconds["compressed-tensors"] / seconds["ours"],
        "ours_over_memcpy": seconds["memcpy"] / seconds["ours"],
    }


def cuda(w: torch.Tensor, reps: int) -> dict:
    qb = _quant_bench()
    from weightsync.quant import pack_int4

    w = w.cuda()
    dst = torch.empty_like(w)
    sync = torch.cuda.synchronize
    ours = qb.median_s(lambda: pack_int4(w, qb.GROUP, True), reps, sync)
    ref = qb.median_s(lambda: qb.reference(w), reps, sync)
    copy = qb.median_s(lambda: dst.copy_(w), reps, sync)
    return {
        "device": torch.cuda.get_device_name(),
        "shape": list(w.shape),
        "median_s": {"triton": ours, "torch reference": ref, "d2d copy": copy},
        "triton_gib_per_s": _gib(w) / ours,
        "triton_over_d2d_copy": copy / ours,
    }
