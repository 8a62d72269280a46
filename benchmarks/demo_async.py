"""The demo synchronous against ``--async``: does the overlapped loop reach the same reward in
less wall-clock time?

Runs ``weightsync demo`` and ``weightsync demo --async`` (same seed and steps, fresh
processes, sync first, then alternating for ``--repeats`` > 1) and prints, per run:

- the final reward (mean of the last quarter of steps, the report's ``reward_last``);
- the loop's wall clock (setup excluded) and per step: the mean, and the median from step 2
  on (``steady``: past the engine's warm-up and the first update's one-time costs);
- ``reach s``: the loop's wall clock until the trailing mean reward over that same quarter
  first reaches the (first) sync run's final reward; ``-`` if it never does;
- the staleness per step (max over a step's samples; the sync loop's is 0 by construction).

Then the per-step table of the first sync and first async run side by side.

    .venv/bin/python -m benchmarks.demo_async [--steps 20] [--seed 0] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.report import print_table, save_rows

MODES = {"sync": [], "async": ["--async"]}
HEADER = ["mode", "run", "ok", "reward first", "reward final", "loop s", "step s (mean)"]
HEADER += ["steady step s", "reach target s", "max staleness", "mean TIS w", "setup s"]


def run_demo(mode: str, steps: int, seed: int, out: Path, extra: list[str]) -> dict:
    """One ``weightsync demo`` in a process of its own; its report.json (and exit code)."""
    cmd = [sys.executable, "-m", "weightsync.cli", "demo", "--steps", str(steps)]
    cmd += ["--seed", str(seed), "--out", str(out), *MODES[mode], *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if not (out / "report.json").exists():
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    report["returncode"] = done.returncode  # 1: report_problems found something (in demo.log)
    return report


def trailing_means(rewards: list[float], window: int) -> list[float]:
    """Mean of each step's reward with the ``window - 1`` before it (fewer at the start)."""
    return [
        sum(rewards[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(rewards))
    ]


def reach_s(report: dict, target: float) -> float | None:
    """Loop wall clock at the end of the first step whose trailing mean reward (the
    ``reward_last`` window) reaches ``target``; None if none does."""
    steps = report["steps"]
    window = max(1, len(steps) // 4)  # Report.summary's reward_last window
    means = trailing_means([s["reward"] for s in steps], window)
    return next((s["elapsed_s"] for s, m in zip(steps, means, strict=True) if m >= target), None)


def summary_row(mode: str, repeat: int, report: dict, target: float) -> dict:
    steps, summary = report["steps"], report["summary"]
    return {
        "mode": mode,
        "repeat": repeat,
        "ok": report["returncode"] == 0,
        "reward_first": summary["reward_first"],
        "reward_final": summary["reward_last"],
        "loop_s": steps[-1]["elapsed_s"],
        "total_s": summary["total_s"],
        "setup_s": summary["setup_s"],
        "mean_step_s": sum(s["step_s"] for s in steps) / len(steps),
        # Past the engine's and the first update's one-time warm-up.
        "steady_step_s": statistics.median(s["step_s"] for s in steps[2:] or steps),
        "reach_s": reach_s(report, target),
        "target": target,
        "max_staleness": max(s["staleness_max"] for s in steps),
        "mean_tis": sum(s["tis_mean"] for s in steps) / len(steps),
        "rewards": [s["reward"] for s in steps],
        "step_s": [s["step_s"] for s in steps],
        "staleness": [s["staleness_max"] for s in steps],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="bench_out/demo_async")
    parser.add_argument(
        "--async-args", default="", help="extra flags for the async run, e.g. '--tis-cap 4'"
    )
    args = parser.parse_args()
    reports: dict[tuple[str, int], dict] = {}
    for r in range(args.repeats):
        # Alternate the order each repeat: a machine that slows down hurts both alike.
        for mode in list(MODES) if r % 2 == 0 else list(MODES)[::-1]:
            extra = args.async_args.split() if mode == "async" else []
            out = Path(args.out, f"{mode}{r}")
            reports[mode, r] = run_demo(mode, args.steps, args.seed, out, extra)
    target = reports["sync", 0]["summary"]["reward_last"]
    rows = [summary_row(m, r, reports[m, r], target) for m in MODES for r in range(args.repeats)]
    save_rows(rows, args.out, "demo_async")
    print(f"target: the sync run's final reward {target:.3f} (mean of its last quarter)\n")
    print_table(
        HEADER,
        [
            [r["mode"], str(r["repeat"]), "yes" if r["ok"] else "no"]
            + [f"{r[k]:.3f}" for k in ("reward_first", "reward_final")]
            + [f"{r['loop_s']:.2f}", f"{r['mean_step_s']:.3f}", f"{r['steady_step_s']:.3f}"]
            + ["-" if r["reach_s"] is None else f"{r['reach_s']:.2f}"]
            + [str(r["max_staleness"]), f"{r['mean_tis']:.3f}", f"{r['setup_s']:.1f}"]
            for r in rows
        ],
    )
    sync, asyn = (next(r for r in rows if r["mode"] == m) for m in MODES)
    print()
    print_table(
        ["step", "sync reward", "async reward", "sync step s", "async step s", "async stale"],
        [step_cells(i, sync, asyn) for i in range(len(sync["rewards"]))],
    )


def step_cells(i: int, sync: dict, asyn: dict) -> list[str]:
    """Step ``i`` of the two runs, side by side."""
    rewards = [f"{r['rewards'][i]:.3f}" for r in (sync, asyn)]
    seconds = [f"{r['step_s'][i]:.3f}" for r in (sync, asyn)]
    return [str(i), *rewards, *seconds, str(asyn["staleness"][i])]


if __name__ == "__main__":
    main()
