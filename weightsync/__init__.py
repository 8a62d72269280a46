"""weightsync: move freshly trained Megatron-core weights into SGLang / vLLM rollout engines."""

from weightsync.config import SyncConfig

__all__ = ["SyncConfig"]
