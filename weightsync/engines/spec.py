"""A serializable handle on one engine: the driver and the trainer's source rank each build
their own HTTP adapter from it (control plane on the driver, buckets on the source rank)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from weightsync.config import SyncConfig
from weightsync.engines.base import Engine

EngineKind = Literal["vllm", "sglang"]


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineSpec:
    kind: EngineKind
    url: str
    name: str = ""
    api_key: str | None = None
    tp_size: int = 1
    """Ranks the engine occupies in a broadcast group (its TP size)."""
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

    def connect(self, sync: SyncConfig | None = None) -> Engine:
        """The adapter for this engine (imports only that adapter), with the deadline and
        flush retries of ``sync`` (defaults: ``SyncConfig()``): one source for both."""
        sync = sync or SyncConfig()
        common = dict(
            url=self.url,
            api_key=self.api_key,
            timeout_s=self.timeout_s or sync.step_timeout_s,
            flush_retries=sync.flush_retries,
        )
        if self.kind == "vllm":
            from weightsync.engines.vllm import VllmEngine, VllmEngineConfig

            return VllmEngine(VllmEngineConfig(**common), name=self.label)
        from weightsync.engines.sglang import SGLangConfig, SGLangEngine

        engine = SGLangEngine(SGLangConfig(tp_size=self.tp_size, **common))
        engine.name = self.label
        return engine


def join_broadcast(
    engine: Engine,
    spec: EngineSpec,
    *,
    master_address: str,
    master_port: int,
    world_size: int,
    rank_offset: int,
    group_name: str,
    backend: str,
) -> None:
    """Have ``engine`` join the trainer's weight group; blocks until the trainer joins too."""
    if spec.kind == "vllm":
        engine.init_broadcast(
            master_address=master_address,
            master_port=master_port,
            world_size=world_size,
            rank_offset=rank_offset,
            group_name=group_name,
        )
    else:
        engine.init_group(
            master_address, master_port, rank_offset, world_size, backend=backend
        ).wait(engine.config.timeout_s)
