"""The RL loop: rollouts on the engine -> reward -> train step on the trainer actors -> sync.

``sync(version)`` is the weight sync (``weightsync.driver`` in the product); it pushes
the trainer's weights into the engine as ``version`` and returns its ``SyncStats``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from weightsync_demo.config import DemoConfig
from weightsync_demo.policy import PolicyWorker
from weightsync_demo.report import Report, StepRecord, table
from weightsync_demo.task import count_up_correct, group_advantages, make_prompts

if TYPE_CHECKING:
    from weightsync.driver import SyncStats
    from weightsync_demo.runtime import DemoRuntime

SyncFn = Callable[[int], "SyncStats"]


def run_step(cfg: DemoConfig, step: int, sync: SyncFn, rt: DemoRuntime) -> StepRecord:
    prompts = make_prompts(cfg.seed, step, cfg.prompts_per_step, cfg.prompt_len, cfg.vocab_size)
    t0 = time.perf_counter()
    groups = rt.rollout.generate(
        prompts, cfg.samples_per_prompt, cfg.response_len, seed=cfg.seed * 1_000_003 + step * 997
    )
    rollout_s = time.perf_counter() - t0
    samples = [s for g in groups for s in g]
    # One reward per response token; a sample's reward (reported) is their mean.
    correct_PGR = torch.tensor(
        [[count_up_correct(s.prompt, s.tokens, cfg.vocab_size) for s in g] for g in groups]
    )
    tokens_BS = torch.tensor([s.prompt + s.tokens for s in samples])
    rollout_lp_BR = torch.tensor([s.logprobs for s in samples])

    t0 = time.perf_counter()
    advantages_BR = group_advantages(correct_PGR).flatten(0, 1)
    train_lp_BR, metrics = _train(cfg, rt, tokens_BS, advantages_BR)
    train_s = time.perf_counter() - t0

    stats = sync(step + 1)
    return StepRecord(
        step=step,
        reward=float(correct_PGR.mean()),
        logprob_diff=float((train_lp_BR - rollout_lp_BR).abs().mean()),
        rollout_version=_common([s.weight_version for s in samples]),
        sample_versions=[s.weight_version for s in samples],
        loss=metrics["loss"],
        rollout_s=rollout_s,
        train_s=train_s,
        sync=_as_dict(stats),
        engine_version=rt.engine_version(),
    )


def _train(cfg: DemoConfig, rt: DemoRuntime, tokens_BS: torch.Tensor, advantages_BR: torch.Tensor):
    """Trainer logprobs of the rollout tokens, then one GRPO step; both on every rank."""
    run_all, timeout = rt.group.run_all, cfg.timeout_s
    # Before the update: the trainer holds the weights the engine sampled with.
    logprobs_BR = run_all(PolicyWorker.logprobs, tokens_BS, cfg.prompt_len, timeout_s=timeout)[0]
    metrics = run_all(
        PolicyWorker.train_step, tokens_BS, cfg.prompt_len, advantages_BR, timeout_s=timeout
    )[0]
    return logprobs_BR, metrics


def run_demo(cfg: DemoConfig, sync: SyncFn, rt: DemoRuntime, progress: bool = True) -> Report:
    """``cfg.steps`` RL steps under a progress bar."""
    from tqdm import tqdm

    # The key opens the engine's routes: it has no place in a report on disk.
    report = Report(config=asdict(cfg) | {"api_key": "<redacted>" if cfg.api_key else None})
    t0 = time.perf_counter()
    if rt.server is None:
        # An external engine serves some checkpoint of its own: start it on the trainer's
        # weights (version 0), as a launched server already is.
        report.initial_sync = _as_dict(sync(0))
    # One line while it runs; the per-step table is printed once, at the end.
    bar = tqdm(range(cfg.steps), desc="rl steps", disable=not progress, dynamic_ncols=True)
    for step in bar:
        record = run_step(cfg, step, sync, rt)
        report.steps.append(record)
        bar.set_postfix(reward=f"{record.reward:.3f}", version=record.engine_version)
    report.total_s = time.perf_counter() - t0
    return report


def run(cfg: DemoConfig, make_sync: Callable[[DemoRuntime], SyncFn], progress: bool = True):
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


def _common(versions: list[str | None]) -> str | None:
    distinct = set(versions)
    return distinct.pop() if len(distinct) == 1 else None


def _as_dict(stats: Any) -> dict[str, Any]:
    if hasattr(stats, "as_dict"):
        return stats.as_dict()
    return asdict(stats)
