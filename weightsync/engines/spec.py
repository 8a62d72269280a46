"""A serializable handle on one engine: the driver and the trainer's source rank each build
their own adapter from it (``engines.base``: control plane on the driver, data plane on the
source rank)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from weightsync.config import SyncConfig
from weightsync.engines.base import ControlPlane, DataPlane

EngineKind = Literal["vllm", "sglang"]


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineSpec:
    kind: EngineKind
    url: str
    name: str = ""
    api_key: str | None = None
    tp_size: int = 1
    """Ranks the engine occupies in a broadcast group or the ring (its TP size); checked
    against the count the engine reports when WeightSync connects."""
    timeout_s: float | None = None
    """This engine's deadline for every call; None: ``SyncConfig.step_timeout_s``."""

    def __post_init__(self) -> None:
        if self.kind not in ("vllm", "sglang"):
            raise ValueError(f"EngineSpec.kind={self.kind!r}: 'vllm' or 'sglang'")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"EngineSpec.url={self.url!r}: an http(s):// URL")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"EngineSpec.timeout_s={self.timeout_s!r}: > 0, or None")

    @property
    def label(self) -> str:
        return self.name or f"{self.kind}@{self.url}"

    def connect(self, sync: SyncConfig | None = None) -> ControlPlane | DataPlane:
        """The adapter for this engine (imports only that adapter): the driver uses it as the
        control plane, the source rank as the data plane. Its deadline, flush retries and
        backoff are ``sync``'s (default ``SyncConfig()``): one source for both planes."""
        sync = sync or SyncConfig()
        common = dict(
            url=self.url,
            api_key=self.api_key,
            timeout_s=self.timeout_s or sync.step_timeout_s,
            flush_retries=sync.flush_retries,
            flush_backoff_s=sync.flush_backoff_s,
            flush_backoff_max_s=sync.flush_backoff_max_s,
        )
        if self.kind == "vllm":
            from weightsync.engines.vllm import VllmEngine, VllmEngineConfig

            return VllmEngine(VllmEngineConfig(**common), name=self.label)
        from weightsync.engines.sglang import SGLangConfig, SGLangEngine

        return SGLangEngine(SGLangConfig(tp_size=self.tp_size, **common), name=self.label)
