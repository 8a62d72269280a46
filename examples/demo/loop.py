"""The RL loop: rollouts on the engine -> reward -> train step on the trainer actors -> sync.

``sync(version)`` is the weight sync (``weightsync.driver`` in the product); it pushes
the trainer's weights into the engine as ``version`` and returns its ``SyncStats``.

With ``DemoConfig.asynchronous`` it is ``WeightSync.update_async``, returning an
``UpdateHandle``: the rollouts for step k+1 are generated while step k trains and its update
runs in the background, within ``max_staleness`` versions of the trained policy
(``weightsync_demo.offpolicy``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from weightsync_demo.config import DemoConfig
from weightsync_demo.offpolicy import check_staleness, must_wait, staleness, version_number
from weightsync_demo.policy import PolicyWorker
from weightsync_demo.report import Report, StepRecord, table
from weightsync_demo.rollout import PendingRollouts, Sample, one_version
from weightsync_demo.task import count_up_correct, group_advantages, make_prompts

if TYPE_CHECKING:
    from weightsync.driver import SyncStats
    from weightsync.inflight import UpdateHandle
    from weightsync_demo.runtime import DemoRuntime

SyncFn = Callable[[int], "SyncStats"]
AsyncSyncFn = Callable[[int], "UpdateHandle"]


def submit_rollouts(cfg: DemoConfig, step: int, rt: DemoRuntime) -> PendingRollouts:
    """Step ``step``'s rollouts, started on the engine (prompts and seeds fixed per step)."""
    prompts = make_prompts(cfg.seed, step, cfg.prompts_per_step, cfg.prompt_len, cfg.vocab_size)
    seed = cfg.seed * 1_000_003 + step * 997
    return rt.rollout.submit(prompts, cfg.samples_per_prompt, cfg.response_len, seed=seed)


def run_step(cfg: DemoConfig, step: int, sync: SyncFn, rt: DemoRuntime) -> StepRecord:
    """One synchronous step: rollouts on version ``step``, train, sync ``step + 1``."""
    t0 = time.perf_counter()
    groups = submit_rollouts(cfg, step, rt).result()
    record = learn(cfg, step, groups, rt, rollout_s=time.perf_counter() - t0)
    record.sync = _as_dict(sync(step + 1))
    record.engine_version = rt.engine_version()
    record.step_s = time.perf_counter() - t0
    return record


def learn(
    cfg: DemoConfig, step: int, groups: list[list[Sample]], rt: DemoRuntime, rollout_s: float
) -> StepRecord:
    """Score step ``step``'s rollouts and train on them (trainer policy version ``step``);
    the record's sync fields are the caller's to fill."""
    samples = [s for g in groups for s in g]
    stale = [staleness(step, s.token_versions) for s in samples]
    check_staleness(step, stale, cfg.max_staleness if cfg.asynchronous else 0)
    # One reward per response token; a sample's reward (reported) is their mean.
    correct_PGR = torch.tensor(
        [[count_up_correct(s.prompt, s.tokens, cfg.vocab_size) for s in g] for g in groups]
    )
    tokens_BS = torch.tensor([s.prompt + s.tokens for s in samples])
    rollout_lp_BR = torch.tensor([s.logprobs for s in samples])
    versions_BR = torch.tensor([[version_number(v) for v in s.token_versions] for s in samples])

    t0 = time.perf_counter()
    advantages_BR = group_advantages(correct_PGR).flatten(0, 1)
    train_lp_BR, metrics = _train(cfg, rt, tokens_BS, advantages_BR, rollout_lp_BR)
    train_s = time.perf_counter() - t0
    # Only tokens sampled with the trainer's weights measure the sync; stale ones differ.
    fresh_BR = versions_BR == step
    diff_BR = (train_lp_BR - rollout_lp_BR).abs()
    return StepRecord(
        step=step,
        reward=float(correct_PGR.mean()),
        logprob_diff=float(diff_BR[fresh_BR].mean()) if fresh_BR.any() else None,
        rollout_version=one_version(s.weight_version for s in samples),
        sample_versions=[s.weight_version for s in samples],
        loss=metrics["loss"],
        rollout_s=rollout_s,
        train_s=train_s,
        sync={},
        engine_version=None,
        staleness_max=max(stale),
        staleness_mean=sum(stale) / len(stale),
        tis_mean=metrics["tis_mean"],
    )


def _train(
    cfg: DemoConfig,
    rt: DemoRuntime,
    tokens_BS: torch.Tensor,
    advantages_BR: torch.Tensor,
    rollout_lp_BR: torch.Tensor,
):
    """Trainer logprobs of the rollout tokens, then one GRPO step (importance-weighted
    against the engine's logprobs); both on every rank."""
    run_all, timeout = rt.group.run_all, cfg.timeout_s
    # Before the update: the weights the step's gradient (and its TIS ratios) start from.
    logprobs_BR = run_all(PolicyWorker.logprobs, tokens_BS, cfg.prompt_len, timeout_s=timeout)[0]
    metrics = run_all(
        PolicyWorker.train_step,
        tokens_BS,
        cfg.prompt_len,
        advantages_BR,
        rollout_lp_BR,
        cfg.tis_cap,
        timeout_s=timeout,
    )[0]
    return logprobs_BR, metrics


class _AsyncLoop:
    """The overlapped loop: step k+1's rollouts run while step k trains and its update
    (``update_async``) pauses the engine in place, so they may span two versions."""

    def __init__(self, cfg: DemoConfig, sync: AsyncSyncFn, rt: DemoRuntime) -> None:
        self.cfg, self.sync, self.rt = cfg, sync, rt
        self.served = 0
        """The newest version the engine is known to hold (0: the launched checkpoint)."""
        self.in_flight: tuple[UpdateHandle, StepRecord] | None = None
        """The update running in the background, and the step whose sync it is."""

    def run(self, on_step: Callable[[StepRecord], None]) -> None:
        cfg, t_loop = self.cfg, time.perf_counter()
        pending = submit_rollouts(cfg, 0, self.rt)
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            groups = pending.result()
            rollout_s = pending.generation_s
            if step + 1 < cfg.steps:
                pending = self._start_next(step + 1)
            record = learn(cfg, step, groups, self.rt, rollout_s)
            # update_async would wait for it anyway; landing it here files its stats.
            self.land()
            self.in_flight = (self.sync(step + 1), record)
            record.step_s = time.perf_counter() - t0
            record.elapsed_s = time.perf_counter() - t_loop
            on_step(record)
        self.land()  # the last update: nothing may still run when the demo ends

    def _start_next(self, step: int) -> PendingRollouts:
        """Step ``step``'s rollouts, on an engine recent enough for ``max_staleness``."""
        if must_wait(step, self.served, self.cfg.max_staleness):
            self.land()
        if must_wait(step, self.served, self.cfg.max_staleness):
            # Only a loop bug: the update they would need has not been issued yet.
            raise RuntimeError(
                f"step {step}: the engine holds version {self.served}, more than "
                f"max_staleness={self.cfg.max_staleness} behind, and no update is in flight"
            )
        return submit_rollouts(self.cfg, step, self.rt)

    def land(self) -> None:
        """Wait for the update in flight (if any); its stats go to the step that issued it."""
        if self.in_flight is None:
            return
        handle, record = self.in_flight
        self.in_flight = None
        record.sync = _as_dict(handle.result())
        # Read before the next update is issued: the version this update left.
        record.engine_version = self.rt.engine_version()
        self.served = handle.version


def run_demo(
    cfg: DemoConfig, sync: SyncFn | AsyncSyncFn, rt: DemoRuntime, progress: bool = True
) -> Report:
    """``cfg.steps`` RL steps under a progress bar; ``sync`` is ``update_async``-like when
    ``cfg.asynchronous``."""
    from tqdm import tqdm

    # The key opens the engine's routes: it has no place in a report on disk.
    report = Report(config=asdict(cfg) | {"api_key": "<redacted>" if cfg.api_key else None})
    t0 = time.perf_counter()
    if rt.server is None:
        # An external engine serves some checkpoint of its own: start it on the trainer's
        # weights (version 0), as a launched server already is.
        first = sync(0)
        report.initial_sync = _as_dict(first.result() if cfg.asynchronous else first)
    # One line while it runs; the per-step table is printed once, at the end.
    bar = tqdm(total=cfg.steps, desc="rl steps", disable=not progress, dynamic_ncols=True)

    def on_step(record: StepRecord) -> None:
        report.steps.append(record)
        bar.update()
        bar.set_postfix(reward=f"{record.reward:.3f}", stale=record.staleness_max)

    try:
        if cfg.asynchronous:
            _AsyncLoop(cfg, sync, rt).run(on_step)
        else:
            for step in range(cfg.steps):
                record = run_step(cfg, step, sync, rt)
                record.elapsed_s = time.perf_counter() - t0
                on_step(record)
    finally:
        bar.close()
    report.total_s = time.perf_counter() - t0
    return report


def run(
    cfg: DemoConfig,
    make_sync: Callable[[DemoRuntime], SyncFn | AsyncSyncFn],
    progress: bool = True,
):
    """Start the runtime, run the loop, write ``report.json`` and ``report.png`` to out_dir."""
    from weightsync_demo.runtime import DemoRuntime

    t0 = time.perf_counter()
    with DemoRuntime.start(cfg) as rt:
        sync = make_sync(rt)
        setup_s = time.perf_counter() - t0
        report = run_demo(cfg, sync, rt, progress=progress)
        report.setup_s = setup_s
    paths = report.write(Path(cfg.out_dir))
    if progress:
        print(table(report))
        print(f"report: {paths[0]}  plot: {paths[1]}")
    return report


def _as_dict(stats: Any) -> dict[str, Any]:
    if hasattr(stats, "as_dict"):
        return stats.as_dict()
    return asdict(stats)
