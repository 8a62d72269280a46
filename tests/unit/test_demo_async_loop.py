"""The demo's --async loop against a fake engine and trainer: what overlaps, what it waits for,
and the staleness bound it keeps (no Ray, no vLLM).

The fake engine switches versions in place: an update in flight lands while the rollouts run
(when they are collected), and a request's tokens before it carry the version it started on,
the rest the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from weightsync_demo.app import report_problems
from weightsync_demo.config import DemoConfig
from weightsync_demo.loop import run_demo
from weightsync_demo.policy import PolicyWorker
from weightsync_demo.rollout import Sample


@dataclass
class FakeEngine:
    version: int = 0
    incoming: int | None = None
    """The version of the update in flight."""
    events: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "default" if self.version == 0 else str(self.version)

    def switch(self) -> None:
        if self.incoming is not None:
            self.version, self.incoming = self.incoming, None
            self.events.append(f"landed {self.version}")


class FakePending:
    """Rollouts that started on the engine's version at submission and finish on its version
    when collected (an in-place switch in between)."""

    def __init__(self, engine: FakeEngine, prompts: list[list[int]], n: int, length: int):
        self.engine, self.prompts, self.n, self.length = engine, prompts, n, length
        self.started = engine.label
        self.generation_s = 0.0

    def result(self) -> list[list[Sample]]:
        half = self.length // 2
        self.engine.switch()
        versions = [self.started] * half + [self.engine.label] * (self.length - half)
        tokens = list(range(self.length))
        return [
            [Sample(p, tokens, [-1.0] * self.length, versions) for _ in range(self.n)]
            for p in self.prompts
        ]


@dataclass
class FakeRollout:
    engine: FakeEngine

    def submit(self, prompts, n, max_tokens, seed) -> FakePending:
        self.engine.events.append(f"submit@{self.engine.version}")
        return FakePending(self.engine, prompts, n, max_tokens)


@dataclass
class FakeGroup:
    engine: FakeEngine

    def run_all(self, fn, tokens_BS, prompt_len, *args, timeout_s):
        if fn is PolicyWorker.logprobs:
            return [torch.full((tokens_BS.shape[0], tokens_BS.shape[1] - prompt_len), -1.0)]
        assert fn is PolicyWorker.train_step
        self.engine.events.append("train")
        return [{"loss": 0.0, "tis_mean": 1.0}]


@dataclass
class FakeStats:
    version: int

    def as_dict(self) -> dict:
        return {"version": self.version, "verified": True}


class FakeHandle:
    """An update in the background: it lands by the time someone waits for it."""

    def __init__(self, engine: FakeEngine, version: int) -> None:
        self.engine, self.version = engine, version
        engine.incoming = version

    def result(self) -> FakeStats:
        self.engine.events.append(f"waited {self.version}")
        self.engine.switch()
        return FakeStats(self.version)


@dataclass
class FakeRuntime:
    engine: FakeEngine
    server: object = object()  # a launched engine: no initial sync

    def __post_init__(self) -> None:
        self.rollout, self.group = FakeRollout(self.engine), FakeGroup(self.engine)

    def engine_version(self) -> str:
        return self.engine.label


def _run(max_staleness: int, steps: int = 5):
    cfg = DemoConfig(
        steps=steps,
        prompts_per_step=2,
        samples_per_prompt=2,
        asynchronous=True,
        max_staleness=max_staleness,
    )
    engine = FakeEngine()

    def update_async(version: int) -> FakeHandle:
        engine.events.append(f"update {version}")
        return FakeHandle(engine, version)

    report = run_demo(cfg, update_async, FakeRuntime(engine), progress=False)
    return report, engine


def test_async_loop_overlaps_rollouts_with_training_and_keeps_the_bound():
    report, engine = _run(max_staleness=1)
    # Step 1's rollouts start before step 0 trains; every later start waits for the update
    # that keeps them within one version.
    assert engine.events[:4] == ["submit@0", "submit@0", "train", "update 1"]
    assert engine.events[4:9] == ["landed 1", "waited 1", "submit@1", "train", "update 2"]
    assert [s.staleness_max for s in report.steps] == [0, 1, 1, 1, 1]
    assert report.steps[1].staleness_mean == 1.0
    # Tokens after the in-place switch are fresh: the sync's fidelity is still measured.
    assert all(s.logprob_diff == 0.0 for s in report.steps)
    assert report.steps[1].rollout_version is None  # each sample spans two versions
    # Every step's update landed (the last one drained) and is filed with its step.
    assert engine.version == 5 and engine.events[-2:] == ["waited 5", "landed 5"]
    assert [s.sync["version"] for s in report.steps] == [1, 2, 3, 4, 5]
    assert [s.engine_version for s in report.steps] == ["1", "2", "3", "4", "5"]
    assert not [p for p in report_problems(report) if "reward" not in p]


def test_a_looser_bound_lets_rollouts_start_before_the_update_lands():
    report, engine = _run(max_staleness=2)
    assert max(s.staleness_max for s in report.steps) <= 2
    # Step 2's rollouts start before the loop waited for update 1 (staleness 2 allowed).
    assert engine.events.index("submit@1") < engine.events.index("waited 1")
    assert not [p for p in report_problems(report) if "reward" not in p]


def test_report_problems_flags_a_step_over_the_bound():
    report, _ = _run(max_staleness=1, steps=2)
    report.steps[1].staleness_max = 2
    assert "step 1: a sample 2 versions stale > 1" in report_problems(report)
    # The synchronous loop allows none.
    report.config["asynchronous"] = False
    report.steps[1].staleness_max = 1
    assert "step 1: a sample 1 versions stale > 0" in report_problems(report)


@pytest.mark.parametrize("steps", [1, 2])
def test_short_async_runs_drain_their_update(steps):
    report, engine = _run(max_staleness=1, steps=steps)
    assert engine.version == steps and len(report.steps) == steps
