"""What an update reports (``WeightSync.update``, ``update_adapter``) and how it fails."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from weightsync.waves import Wave

if TYPE_CHECKING:
    from weightsync.sender import SendStats


@dataclass
class SyncStats:
    version: int
    export_s: float
    quantize_s: float
    transfer_s: float
    engine_load_s: float
    pause_s: float
    """The longest any engine was paused: its wave's pause call to its resume returned (one
    wave of every engine unless ``SyncConfig.min_serving``)."""
    staged_s: float
    """Export + int4 done before the pause (``SyncConfig.stage_bytes``)."""
    total_s: float
    nbytes: int
    num_buckets: int
    stale: list[str] = field(default_factory=list)
    verify: str = "off"
    """The level every engine that can was verified at (``SyncConfig.verify``)."""
    verified: bool = False
    """Every engine's weights, read back through its kernels, equal the trainer's at level
    ``verify`` (False when it is off or an engine cannot be read back: ``unverified``)."""
    unverified: list[str] = field(default_factory=list)
    """Engines that cannot read their weights back (SGLang): only their completeness, where
    they report it, was checked."""
    verify_s: float = 0.0
    """The completeness check, the engines' read-back and the comparison, in the pause."""
    probe_s: float = 0.0
    """The source rank digesting the probed columns of what it sent (during the send)."""
    apply_s: float = 0.0
    """Engine-side staging (``SyncConfig.engine_stage_bytes``): the engines' load from their
    staging areas, the only transfer-related part of the pause."""
    trainer_blocked_s: float = 0.0
    """How long the caller (the trainer's loop) waited: all of ``total_s`` for ``update``,
    the checks and the staged export for ``update_async``."""
    kv_cache: str = "recompute"
    """What became of KV computed under the old weights (``SyncConfig.kv_cache``):
    ``recompute`` dropped in the pause, ``reuse`` kept (in-place pause)."""
    waves: list[Wave] = field(default_factory=list)
    """Which engines switched together, in order, each wave's pause (``min_serving``)."""
    rank_bytes: dict[str, list[int]] = field(default_factory=dict)
    """``SyncConfig.sharded``: the bytes each engine rank was sent (its own slices, as the
    plan cuts them; every rank loads a tensor only once exactly those arrived), by engine;
    empty when every engine rank received the whole model (the gathered path)."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdapterStats:
    """One adapter-only update (``WeightSync.update_adapter``)."""

    version: int
    adapter: str
    """The name rollouts ask for: ``<LoraSync.name>@v<version>``."""
    path: str | None
    """Where the source rank wrote it (``LoraSync.path``) for the engines that load it from
    disk (vLLM); None when every live engine took it from memory (SGLang)."""
    nbytes: int
    export_s: float
    transfer_s: float
    """The source rank writing it to ``LoraSync.root`` and handing it to the engines that
    load it from memory (their load included)."""
    engine_load_s: float
    """Every engine that loads it from disk loading it, at once."""
    total_s: float
    pause_s: float = 0.0
    """Always 0: nothing is paused (named as in ``SyncStats`` for reports side by side)."""
    unloaded: list[str] = field(default_factory=list)
    verified: bool = False
    """Every live engine's LoRA slots hold exactly this adapter (``SyncConfig.verify``)."""
    unverified: list[str] = field(default_factory=list)
    """Live engines that cannot read an adapter back (SGLang)."""
    verify_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class UpdateFailed(RuntimeError):
    """An update that broke after engines were paused; they were resumed (or held), ``stale``
    marked."""

    def __init__(self, message: str, stale: list[str]) -> None:
        super().__init__(message)
        self.stale = stale


def sync_stats(version: int, send: SendStats, pause_s: float, total_s: float) -> SyncStats:
    return SyncStats(
        version=version,
        export_s=send.export_s,
        quantize_s=send.quantize_s,
        staged_s=send.staged_s,
        transfer_s=send.transfer_s,
        engine_load_s=send.engine_load_s,
        nbytes=send.nbytes,
        num_buckets=send.num_buckets,
        probe_s=send.probe_s,
        apply_s=send.apply_s,
        pause_s=pause_s,
        total_s=total_s,
        verify_s=send.verify_s,
        rank_bytes=dict(send.rank_bytes),
    )
