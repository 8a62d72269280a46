"""``weightsync demo``: the RL loop with the product's weight sync (``WeightSync``) plugged in.

The flags are defined in ``weightsync.cli`` (the demo's ones map onto ``DemoConfig``, the
sync's onto ``SyncConfig``); ``main(args)`` runs with them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from weightsync import LoraSync, SyncConfig, WeightSync
from weightsync.config import MiB
from weightsync.private_dir import private_dir
from weightsync_demo.config import DemoConfig
from weightsync_demo.loop import run
from weightsync_demo.model import int4_config
from weightsync_demo.report import Report

log = logging.getLogger("weightsync_demo")


def demo_config(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        steps=args.steps,
        int4=args.int4,
        lora_rank=args.lora,
        engine=args.engine,
        engine_url=args.engine_url,
        engine_tp=args.engine_tp,
        api_key=args.api_key,
        ray_address=args.ray_address,
        seed=args.seed,
        out_dir=args.out,
        asynchronous=args.asynchronous,
        max_staleness=args.max_staleness,
        tis_cap=args.tis_cap,
    )


def sync_config(args: argparse.Namespace) -> SyncConfig:
    # verify reads the weights back through the engine's kernels (every rank's shard) where
    # the engine can (vLLM); an SGLang engine is reported as unverified.
    if args.sharded and (args.asynchronous or args.engine != "vllm"):
        raise ValueError("--sharded runs with --engine vllm and without --async (update_async)")
    return SyncConfig(
        transport=args.transport,
        sharded=args.sharded,
        pause_mode=pause_mode(args),
        kv_cache=args.kv_cache,
        bucket_bytes=args.bucket_mib * MiB,
        stage_bytes=args.stage_mib * MiB,
        verify=args.verify,
        # One adapter directory per run (a second demo must not meet the first one's).
        lora=LoraSync(root=str(Path(args.out).resolve() / "adapters")) if args.lora else None,
    )


def pause_mode(args: argparse.Namespace) -> str:
    """--pause-mode, by default ``retract``; with --async ``in_place``: the next step's
    rollouts are running when an update pauses the engine, and must survive it."""
    if args.pause_mode is None:
        # SGLang cannot drop the frozen requests' old KV in place (the driver refuses it with
        # kv_cache="recompute"); retract requeues them, recomputed on the new weights.
        return "in_place" if args.asynchronous and args.engine == "vllm" else "retract"
    if args.engine == "sglang" and args.pause_mode == "in_place" and args.kv_cache != "reuse":
        raise ValueError(
            "pause_mode='in_place' with --engine sglang: SGLang cannot drop the KV of requests "
            "paused in place; add --kv-cache reuse, or use retract"
        )
    if args.asynchronous and args.pause_mode == "abort":
        raise ValueError(
            "pause_mode='abort' with --async: it would end the rollouts that run across "
            "each sync (use in_place or retract)"
        )
    return args.pause_mode


def main(args: argparse.Namespace) -> int:
    """``weightsync demo``: 0 when every promise held (``report_problems``), else 1."""
    cfg, sync_cfg = demo_config(args), sync_config(args)  # ValueError before anything starts
    # The engine loads the models (and adapters) the demo writes here: only ours (ValueError).
    out = private_dir(cfg.out_dir)
    log_file = _log_to_file(out / "demo.log")
    try:
        report = run_with_weightsync(cfg, sync_cfg)
    except Exception:
        # The traceback follows on the console; the rest of the story is in these files.
        logs = [out / n for n in ("demo.log", "vllm_server.log", "ray_logs")]
        found = ", ".join(str(p) for p in logs if p.exists())
        print(f"weightsync demo failed (traceback below); logs: {found}", file=sys.stderr)
        raise
    finally:
        logging.getLogger().removeHandler(log_file)
        log_file.close()
    return 1 if report_problems(report) else 0


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, mode="w")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def run_with_weightsync(cfg: DemoConfig, sync_cfg: SyncConfig) -> Report:

    def make_sync(rt):
        ws = WeightSync(rt.group, [rt.engine_spec], sync_cfg, int4_config(cfg), owner="demo")
        rt.on_close.append(ws.close)  # while the trainer actors still exist
        if cfg.asynchronous:
            return ws.update_async  # the loop waits on its handles
        if not cfg.lora_rank:
            return ws.update

        def sync_adapter(version: int):
            stats = ws.update_adapter(version)
            rt.rollout.adapter = ws.adapter  # the next rollouts ask for the new adapter
            return stats

        return sync_adapter

    report = run(cfg, make_sync)
    for problem in report_problems(report):
        log.error("%s", problem)
    return report


LOGPROB_DIFF_BOUND = 0.01
"""Mean |logp_trainer - logp_engine| per token, bf16 and int4 alike: the engine must serve the
weights the trainer's forward used (int4: on the same grid), so only kernel rounding remains."""


def report_problems(report: Report, logprob_bound: float = LOGPROB_DIFF_BOUND) -> list[str]:
    """What the main job promises, checked on its report: empty means every promise held."""
    problems = []
    asynchronous = report.config.get("asynchronous", False)
    # The synchronous loop samples on the weights it trains; --async up to max_staleness back.
    bound = report.config.get("max_staleness", 1) if asynchronous else 0
    for i, step in enumerate(report.steps):
        want = i + 1
        if step.sync.get("version") != want or step.engine_version != str(want):
            problems.append(
                f"step {i}: synced version {step.sync.get('version')}, engine "
                f"reports {step.engine_version!r}, expected {want}"
            )
        # verify reads back the base weights after a full sync, the adapter's LoRA slots
        # after an adapter sync.
        verifiable = report.config.get("engine") == "vllm"
        level = step.sync.get("verify", "sample")
        if not step.sync.get("verified", False) and verifiable and level != "off":
            problems.append(f"step {i}: engine weights were not verified after the sync")
        if step.sync.get("verified") and step.sync.get("unverified"):
            problems.append(f"step {i}: {step.sync['unverified']} counted as verified")
        if step.rollout_version not in (None, str(i)) and i > 0 and not asynchronous:
            problems.append(f"step {i}: rollouts ran on version {step.rollout_version}, not {i}")
        if step.staleness_max > bound:
            problems.append(f"step {i}: a sample {step.staleness_max} versions stale > {bound}")
        # None: no token came from the trainer's weights (async), nothing to compare.
        if step.logprob_diff is not None and step.logprob_diff > logprob_bound:
            problems.append(
                f"step {i}: train/rollout logprob diff {step.logprob_diff:.4f} > {logprob_bound}"
            )
    summary = report.summary()
    if report.steps and not summary["reward_last"] > summary["reward_first"]:
        problems.append(
            f"reward did not rise: {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}"
        )
    return problems
