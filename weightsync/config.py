"""Typed configuration. Built once by the host framework and passed in explicitly.

Every field is validated in ``__post_init__``; a bad value raises ``ValueError`` naming the
field, what was given and what is allowed, before anything touches an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TransportKind = Literal["broadcast", "ipc", "disk"]
PauseMode = Literal["abort", "retract", "in_place"]

_TRANSPORTS = ("broadcast", "ipc", "disk")
_PAUSE_MODES = ("abort", "retract", "in_place")
MiB = 1 << 20


def _require(ok: bool, field: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: {allowed}")


@dataclass(kw_only=True, slots=True, frozen=True)
class SyncConfig:
    """How one weight update moves bytes and how long any step may wait."""

    transport: TransportKind = "broadcast"
    """broadcast (NCCL on GPU, gloo on CPU), ipc (CUDA IPC, CPU shared memory) or disk."""
    bucket_bytes: int = 512 * MiB
    """Upper bound of one bucket; an atomic unit larger than this gets a bucket of its own."""
    pause_mode: PauseMode = "retract"
    """How engines stop generating: abort, retract (requeue, prefix recomputed) or in_place."""
    step_timeout_s: float = 300.0
    """Deadline of every single wait (HTTP call, barrier, bucket acknowledgement)."""
    flush_retries: int = 5
    """Bounded retries of the engine cache flush, with exponential backoff."""
    verify: bool = False
    """After the update, compare engine weights against what was sent."""
    stage_bytes: int = 0
    """Export and quantize up to this many bytes of the update before the engines are paused,
    held in the source rank's memory until sent: the pause window then only moves them. 0
    streams everything during the pause (extra trainer memory: two buckets)."""

    def __post_init__(self) -> None:
        _require(
            self.transport in _TRANSPORTS, "transport", self.transport, f"one of {_TRANSPORTS}"
        )
        _require(
            self.pause_mode in _PAUSE_MODES, "pause_mode", self.pause_mode, f"one of {_PAUSE_MODES}"
        )
        _require(self.bucket_bytes >= MiB, "bucket_bytes", self.bucket_bytes, "at least 1 MiB")
        _require(self.step_timeout_s > 0, "step_timeout_s", self.step_timeout_s, "must be > 0")
        _require(self.flush_retries >= 0, "flush_retries", self.flush_retries, "must be >= 0")
        _require(self.stage_bytes >= 0, "stage_bytes", self.stage_bytes, "must be >= 0")
