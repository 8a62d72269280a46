"""What the demo measured: one record per step, a table, a JSON report and a PNG plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SYNC_FIELDS = ("export_s", "quantize_s", "transfer_s", "engine_load_s", "pause_s", "total_s")


@dataclass
class StepRecord:
    step: int
    reward: float
    """Mean reward of this step's rollouts (before the train step)."""
    logprob_diff: float | None
    """Mean |log p_trainer - log p_rollout| over the rollout tokens sampled with the trainer's
    current weights (measured before the train step; sync loop: every token). None when every
    token is stale (async loop): it measures the sync's fidelity, not the policy's drift."""
    rollout_version: str | None
    """The engine's weight version the rollouts were sampled with (None: several)."""
    sample_versions: list[str | None]
    loss: float
    rollout_s: float
    """From the rollouts' submission to their last answer (async: beside the previous step)."""
    train_s: float
    sync: dict[str, Any]
    """The sync's SyncStats as a dict (seconds per stage, version, bytes)."""
    engine_version: str | None
    """The engine's weight version right after the sync."""
    staleness_max: int = 0
    """Over this step's samples: how many versions the oldest token lags the trained policy."""
    staleness_mean: float = 0.0
    tis_mean: float = 1.0
    """Mean truncated importance weight over the step's tokens (~1 on-policy)."""
    step_s: float = 0.0
    """Wall clock of the step in the loop (async: what it waited for, not what overlapped)."""
    elapsed_s: float = 0.0
    """Wall clock from the loop's start to this step's end."""


@dataclass
class Report:
    config: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)
    setup_s: float = 0.0
    total_s: float = 0.0
    initial_sync: dict[str, Any] | None = None
    """Only for an external engine: the sync that loaded the trainer's initial weights."""

    def summary(self) -> dict[str, Any]:
        rewards = [s.reward for s in self.steps]
        k = max(1, len(rewards) // 4)
        totals = [s.sync.get("total_s", 0.0) for s in self.steps]
        diffs = [s.logprob_diff for s in self.steps if s.logprob_diff is not None]
        return {
            "steps": len(self.steps),
            "reward_first": sum(rewards[:k]) / k if rewards else None,
            "reward_last": sum(rewards[-k:]) / k if rewards else None,
            "max_logprob_diff": max(diffs, default=None),
            "max_staleness": max((s.staleness_max for s in self.steps), default=None),
            "mean_sync_s": sum(totals) / len(totals) if totals else None,
            "setup_s": self.setup_s,
            "total_s": self.total_s,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "summary": self.summary(),
            "initial_sync": self.initial_sync,
            "steps": [asdict(s) for s in self.steps],
        }

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, png_path = out_dir / "report.json", out_dir / "report.png"
        json_path.write_text(json.dumps(self.to_json(), indent=2))
        plot(self, png_path)
        return json_path, png_path


HEADER = (
    f"{'step':>4} {'reward':>6} {'|dlogp|':>8} {'version':>8} {'stale':>5} {'mean':>5} "
    f"{'tis':>5} {'export':>7} {'quant':>6} {'xfer':>6} {'load':>6} {'pause':>6} {'sync':>6} "
    f"{'step_s':>6}"
)


def table_row(s: StepRecord) -> str:
    t = [s.sync.get(f, 0.0) for f in SYNC_FIELDS]
    diff = "-" if s.logprob_diff is None else f"{s.logprob_diff:.4f}"
    return (
        f"{s.step:>4} {s.reward:>6.3f} {diff:>8} {s.rollout_version!s:>8} "
        f"{s.staleness_max:>5} {s.staleness_mean:>5.2f} {s.tis_mean:>5.3f} "
        f"{t[0]:>7.3f} {t[1]:>6.3f} {t[2]:>6.3f} {t[3]:>6.3f} {t[4]:>6.3f} {t[5]:>6.3f} "
        f"{s.step_s:>6.3f}"
    )


def table(report: Report) -> str:
    return "\n".join([HEADER, *(table_row(s) for s in report.steps)])


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines or Ray workers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [s.step for s in report.steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [s.reward for s in report.steps], marker="o")
    top.set_ylabel("mean reward")
    top.set_title("weightsync demo: count-up task, GRPO")
    bottom_acc = [0.0] * len(steps)
    for name in SYNC_FIELDS[:4]:
        values = [s.sync.get(name, 0.0) for s in report.steps]
        bottom.bar(steps, values, bottom=bottom_acc, label=name.removesuffix("_s"))
        bottom_acc = [a + v for a, v in zip(bottom_acc, values, strict=True)]
    bottom.plot(steps, [s.sync.get("pause_s", 0.0) for s in report.steps], "k.-", label="pause")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("step")
    bottom.set_ylabel("sync seconds")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
