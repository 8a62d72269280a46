"""weightsync: move freshly trained Megatron-core weights into SGLang / vLLM rollout engines.

The public API::

    from weightsync import EngineSpec, Int4Config, LoraSync, SyncConfig, UpdateFailed, WeightSync

Imported on first use, so ``weightsync``'s command line starts without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsync.config import LoraSync, SyncConfig
    from weightsync.driver import WeightSync
    from weightsync.engines.spec import EngineSpec
    from weightsync.inflight import UpdateHandle, UpdateInFlight
    from weightsync.quant import Int4Config
    from weightsync.stats import AdapterStats, SyncStats, UpdateFailed

_HOMES = {
    "AdapterStats": "weightsync.stats",
    "LoraSync": "weightsync.config",
    "SyncConfig": "weightsync.config",
    "EngineSpec": "weightsync.engines.spec",
    "Int4Config": "weightsync.quant",
    "SyncStats": "weightsync.stats",
    "UpdateFailed": "weightsync.stats",
    "UpdateHandle": "weightsync.inflight",
    "UpdateInFlight": "weightsync.inflight",
    "WeightSync": "weightsync.driver",
}
__all__ = [
    "AdapterStats",
    "EngineSpec",
    "Int4Config",
    "LoraSync",
    "SyncConfig",
    "SyncStats",
    "UpdateFailed",
    "UpdateHandle",
    "UpdateInFlight",
    "WeightSync",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'weightsync' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
