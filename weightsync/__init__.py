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
    from weightsync.driver import AdapterStats, SyncStats, UpdateFailed, WeightSync
    from weightsync.engines.spec import EngineSpec
    from weightsync.quant import Int4Config

_HOMES = {
    "AdapterStats": "weightsync.driver",
    "LoraSync": "weightsync.config",
    "SyncConfig": "weightsync.config",
    "EngineSpec": "weightsync.engines.spec",
    "Int4Config": "weightsync.quant",
    "SyncStats": "weightsync.driver",
    "UpdateFailed": "weightsync.driver",
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
    "WeightSync",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'weightsync' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
