"""The one source of deadlines, retries and sizes. Built once by the host framework and passed
in explicitly; the engine adapters on the driver and on the source rank take their deadline
and flush retries from it (``EngineSpec.connect``).

Every field is validated in ``__post_init__``; a bad value raises ``ValueError`` naming the
field, what was given and what is allowed, before anything touches an engine.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from weightsync.inflight import IN_FLIGHT_POLICIES, InFlightPolicy

TransportKind = Literal["broadcast", "ipc"]
PauseMode = Literal["abort", "retract", "in_place"]
VerifyLevel = Literal["off", "sample", "full"]
OnVerifyFailure = Literal["hold", "resume"]
KvCache = Literal["recompute", "reuse"]

_TRANSPORTS = ("broadcast", "ipc")
_PAUSE_MODES = ("abort", "retract", "in_place")
_LEVELS = ("off", "sample", "full")
_ON_FAILURE = ("hold", "resume")
_KV_CACHE = ("recompute", "reuse")
MiB = 1 << 20
DEFAULT_TIMEOUT_S = 300.0
"""The default deadline of every single wait: long enough for a multi-GiB bucket on a slow
link, short enough that a dead peer is noticed within minutes."""


def _require(ok: bool, field: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: {allowed}")


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


@dataclass(kw_only=True, slots=True, frozen=True)
class LoraSync:
    """Adapter-only sync (``WeightSync.update_adapter``; see ``weightsync.lora``)."""

    name: str = "policy"
    """Adapter name; version N is served as ``<name>@v<N>``."""
    root: str = field(default_factory=lambda: f"/dev/shm/weightsync-lora-{os.getuid()}")
    """Where the source rank writes each version, readable by every engine (tmpfs on the
    engines' host; a shared file system for engines on other hosts). Created 0700 and ours
    (``weightsync.private_dir``): an existing one owned by another user or writable by
    others is refused before any engine is touched; per user by default, so another
    user's cannot block it. Engines must run as this user (or root)."""
    keep: int = 2
    """Versions each engine keeps loaded: the current one and the previous ones in-flight
    rollouts may still use. The engine's ``--max-loras`` must be at least this."""

    def __post_init__(self) -> None:
        _require(
            bool(_ADAPTER_NAME.fullmatch(self.name)),
            "LoraSync.name",
            self.name,
            "1-64 of [A-Za-z0-9_.-], not starting with '.'",
        )
        _require(os.path.isabs(self.root), "LoraSync.root", self.root, "an absolute path")
        _require(
            type(self.keep) is int and self.keep >= 1, "LoraSync.keep", self.keep, "an int >= 1"
        )

    def served_name(self, version: int) -> str:
        return f"{self.name}@v{version}"

    def path(self, sync_id: str, served: str) -> Path:
        """Each WeightSync writes under its own directory: two runs sharing ``root`` never
        prune or overwrite each other's adapters."""
        return Path(self.root) / sync_id / served


@dataclass(kw_only=True, slots=True, frozen=True)
class SyncConfig:
    """How one weight update moves bytes and how long any step may wait."""

    transport: TransportKind = "broadcast"
    """broadcast (NCCL on GPU, gloo on CPU; vLLM engines: gloo) or ipc (the shared-memory
    ring, for vLLM engines on the trainer's host). SGLang's CUDA-IPC payloads
    (``weightsync.transport.ipc``) and the disk transport are library pieces WeightSync does
    not drive yet."""
    bucket_bytes: int = 512 * MiB
    """Upper bound of one bucket; an atomic unit larger than this gets a bucket of its own."""
    pause_mode: PauseMode = "retract"
    """How engines stop generating: abort, retract (requeue, prefix recomputed) or in_place."""
    step_timeout_s: float = DEFAULT_TIMEOUT_S
    """Deadline of every single wait (HTTP call, barrier, bucket acknowledgement)."""
    flush_retries: int = 8
    """Bounded retries of the engine cache flush, with exponential backoff: by default about
    7 s in all, time for an engine's in-flight step to end (SGLang refuses until idle)."""
    flush_backoff_s: float = 0.05
    """First wait after a refused flush; doubles each time up to ``flush_backoff_max_s``."""
    flush_backoff_max_s: float = 2.0
    verify: VerifyLevel = "sample"
    """How much of what each engine computes with is read back through its kernels and
    compared with what the trainer sent, inside the pause (``weightsync.proof``): ``sample``
    one random column per column range of every weight (every int4 group and TP shard
    holds one; new columns each update), all rows; ``full`` every element; ``off`` none.
    Whatever the level, an update fails unless every engine rank loaded every tensor sent."""
    on_verify_failure: OnVerifyFailure = "hold"
    """An engine that fails verify or the completeness check: ``hold`` keeps it paused,
    serving nothing, until an update verifies it; ``resume`` lets it serve, marked stale."""
    stage_bytes: int = 0
    """Export and quantize up to this many bytes of the update before the engines are paused,
    held in the source rank's memory until sent: the pause window then only moves them. 0
    streams everything during the pause (extra trainer memory: two buckets)."""
    lora: LoraSync | None = None
    """Adapter-only sync settings; None: ``WeightSync.update_adapter`` is refused."""
    engine_stage_bytes: int = 0
    """Engine-side staging (vLLM engines): > 0 sends every bucket into a staging area in the
    engine's host memory before the pause, while it generates, and the pause holds only the
    load from there (one call: start, every bucket, finish). The bound: an update larger than
    this, or than the engine's host can hold, is refused before anything moves. 0: the
    buckets are loaded as they arrive, in the pause."""
    in_flight: InFlightPolicy = "wait"
    """A call (``update``, ``update_async``, ``verify``, ``update_adapter``) made while an
    ``update_async`` is still running: ``wait`` for it, or ``fail`` (``UpdateInFlight``)."""
    kv_cache: KvCache = "recompute"
    """KV computed under the old weights, after the switch: ``recompute`` drops it in the
    pause (the prefix cache, and the KV of requests paused in flight: they go on with the
    tokens they have, recomputed under the new weights); ``reuse`` keeps both (only with
    ``pause_mode="in_place"``: the lowest ramp-down, each token's KV from whichever
    version computed it). ``SyncStats.kv_cache`` says which was done."""
    min_serving: float = 0.0
    """The least fraction of the fleet that keeps generating at every moment of an update.
    0 pauses every engine at once; > 0 switches the engines in waves of at most
    ``(1 - min_serving) * engines`` (at least one), each wave paused, loaded, verified,
    stamped and resumed whole while the others serve (needs ``engine_stage_bytes``: the
    bytes reach every engine before the first wave pauses). ``SyncStats.waves``."""
    sharded: bool = False
    """Many-to-many (vLLM engines, broadcast transport): every trainer rank sends its own
    slices point to point and every engine rank receives only the slices it serves
    (``weightsync.reshard``), no tensor gathered anywhere; ``SyncStats.rank_bytes``. False:
    the source rank gathers and broadcasts the whole model to every engine rank."""

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
        _require(
            0 <= self.flush_backoff_s <= self.flush_backoff_max_s,
            "flush_backoff_s",
            self.flush_backoff_s,
            f"0 <= flush_backoff_s <= flush_backoff_max_s ({self.flush_backoff_max_s})",
        )
        if isinstance(self.verify, bool):  # the bool it was before the levels
            warnings.warn(
                "SyncConfig.verify=True/False is deprecated: use 'sample' (or 'full') / 'off'",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "verify", "sample" if self.verify else "off")
        _require(self.verify in _LEVELS, "verify", self.verify, f"one of {_LEVELS}")
        _require(
            self.on_verify_failure in _ON_FAILURE,
            "on_verify_failure",
            self.on_verify_failure,
            f"one of {_ON_FAILURE}",
        )
        _require(self.stage_bytes >= 0, "stage_bytes", self.stage_bytes, "must be >= 0")
        _require(
            self.engine_stage_bytes >= 0,
            "engine_stage_bytes",
            self.engine_stage_bytes,
            "must be >= 0",
        )
        _require(
            self.in_flight in IN_FLIGHT_POLICIES,
            "in_flight",
            self.in_flight,
            f"one of {IN_FLIGHT_POLICIES}",
        )
        _require(self.kv_cache in _KV_CACHE, "kv_cache", self.kv_cache, f"one of {_KV_CACHE}")
        _require(
            self.kv_cache == "recompute" or self.pause_mode == "in_place",
            "kv_cache",
            self.kv_cache,
            f"'reuse' keeps KV only in a pause_mode='in_place' pause ({self.pause_mode!r} "
            "drops it)",
        )
        _require(0 <= self.min_serving < 1, "min_serving", self.min_serving, "0 <= x < 1")
        _require(
            not self.min_serving or self.engine_stage_bytes > 0,
            "min_serving",
            self.min_serving,
            "waves need engine-side staging (engine_stage_bytes > 0): every engine takes "
            "the bytes before the first wave pauses",
        )
        _require(
            not self.sharded or (self.transport == "broadcast" and not self.engine_stage_bytes),
            "sharded",
            self.sharded,
            "the sharded sync runs over the broadcast transport's group, without engine-side "
            f"staging (transport={self.transport!r}, engine_stage_bytes={self.engine_stage_bytes})",
        )
