"""The two halves of an engine adapter: what the driver and the source rank each call.

Every engine is driven by two adapter instances in two processes, built from one
``EngineSpec`` (``spec.connect(sync)``):

- ``ControlPlane``, in the driver (``WeightSync``): generation and the update session. One
  update, for every engine of the fleet::

      ranks()                          # when connecting: the engine's own rank count
      model_config()                   # before anything is paused: the served model's fields
      pause(mode); flush_cache(); begin_update()
      ... the source rank streams the buckets (data plane) ...
      end_update()                     # engine post-processing (e.g. the int4 repack)
      session_report()                 # completeness: what every rank loaded
      live_digests(probe)              # verify: the weights the kernels compute with
      set_version(version); resume()
      on failure: abort_update(); set_version("partial-<version>"); resume() (or held paused)

  An adapter-only update (nothing paused): load_adapter(name, path) on every live engine
  (or, in memory, the data plane's load_adapter_tensors), adapter_digests(name, seed) with
  verify, unload_adapter(old) once it is retired.

- ``DataPlane``, on the trainer's source rank, where the bytes are: it joins the transport
  from one typed ``Link``, checks the plan, and hands over the buckets::

      check_link(link); join(link).wait(deadline)   # beside the trainer's side of the link
      validate(plan)                   # before anything is paused: ValueError names the tensor
      for bucket: pending = update_bucket(bucket, ticket) ... pending.wait(deadline)

Adapters speak their engine's own HTTP RL API; nothing here imports an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from weightsync.plan import Bucket, Plan
from weightsync.proof import Probe
from weightsync.transport.base import Ticket
from weightsync.transport.shm import RingSpec


@dataclass(frozen=True, kw_only=True, slots=True)
class BroadcastLink:
    """The trainer's weight group: the source rank is rank 0 and hosts the store; this
    engine's TP ranks join as ``rank_offset`` .. ``rank_offset + tp_size - 1``."""

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int
    group_name: str
    backend: str
    """gloo (CPU trainer) or nccl (GPU trainer)."""
    sharded: bool = False
    """Every trainer rank is in the group (ranks 0 .. ``senders`` - 1) and sends its own
    slices (``weightsync.shard_transfer``), not the source rank everything."""
    senders: int = 1
    """The trainer's ranks in the group (sharded: all of them; else the source rank)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ShmLink:
    """The source rank's shared-memory ring: this engine's TP ranks consume it as
    ``consumer_index`` .. ``consumer_index + tp_size - 1``. The source rank unlinks the
    names once every engine joined (the mappings stay): no rank of any engine can tell
    whether it attaches last, as an engine's ranks attach concurrently."""

    ring: RingSpec
    consumer_index: int


Link = BroadcastLink | ShmLink


@dataclass(frozen=True, slots=True)
class Applied:
    """A staged update applied (``ControlPlane.apply_staged``), with what the same call
    also answered, so the pause holds one round trip where it would hold three."""

    load_s: float
    """The slowest rank's own load from staging (start, every bucket, finish)."""
    readback_s: float
    """The slowest rank's read-back at the probe (0 without one)."""
    session: list[dict]
    """Per rank, what it loaded (``session_report``'s answer)."""
    digests: dict[str, str] | None = None
    """The fingerprints ``live_digests(probe)`` would answer; None without a probe."""


class EngineFailed(RuntimeError):
    """A step failed on named engines; the driver marks exactly those stale. Pickles whole,
    so it crosses Ray with the names intact."""

    def __init__(self, engines: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.engines = tuple(engines)

    def __reduce__(self):
        return type(self), (self.engines, str(self))


class Pending(Protocol):
    """A request in flight (a bucket, a join)."""

    def wait(self, timeout_s: float) -> object:
        """Block until the engine answered; TimeoutError past the deadline, RuntimeError
        carrying the engine's error text if it failed."""
        ...

    def done(self) -> bool:
        """The engine answered (``wait`` returns or raises at once)."""
        ...


class ControlPlane(Protocol):
    name: str
    verifiable: bool
    """Reads its weights back through its kernels (``live_digests``); else unverified."""

    def ranks(self) -> int:
        """The worker ranks the engine itself reports (its TP size): each joins the weight
        group, or reads the ring, as a rank of its own."""
        ...

    def model_config(self) -> dict | None:
        """The served model's config fields (``weightsync.model_config.summary``), or None
        where the engine cannot tell."""
        ...

    def pause(self, mode: str) -> None: ...

    def flush_cache(self) -> bool:
        """Drop cached prefixes computed with the old weights; False if the engine refused
        ``SyncConfig.flush_retries + 1`` times."""
        ...

    def begin_update(self) -> None: ...

    def end_update(self) -> None: ...

    def apply_staged(self, probe: Probe | None = None) -> Applied | None:
        """In the pause: load the staged update whole (one session), or abort it keeping
        every layer whole. May also answer completeness and the fingerprints at ``probe``
        (``Applied``); None: ask ``session_report`` and ``live_digests``."""
        ...

    def drop_staged(self) -> None:
        """Let go of a staged update that will not be applied."""
        ...

    def abort_update(self) -> None:
        """Close a session that an update could not finish, leaving a model that can serve
        (a stale one); a no-op when no session is open."""
        ...

    def live_digests(self, probe: Probe) -> dict[str, str]:
        """Fingerprints (``weightsync.proof``) of the weights the engine's kernels compute
        with, by HF name, aliases included; ValueError where the engine cannot read back."""
        ...

    def session_report(self) -> list[dict] | None:
        """Per rank, what the last update session loaded: ``{"received": {tensor:
        elements}, "unloaded": [layer, ...]}``; None where the engine cannot tell."""
        ...

    def unrepairable(self) -> list[str]:
        """Layers whose post-processing an update could not redo, named; connect refuses
        an engine that has any, before anything is paused."""
        ...

    def aliases(self) -> dict[str, str]:
        """``{name: checkpoint name}`` of every weight the engine computes with under a name
        the checkpoint does not have (a tied head), found in the served model."""
        ...

    def set_version(self, version: str) -> None: ...

    def get_version(self) -> str | None: ...

    def resume(self) -> None: ...

    def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT adapter in directory ``path`` (``weightsync.lora``) under ``name``
        through the engine's runtime LoRA API; requests asking for ``name`` then use it."""
        ...

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``; a no-op when the engine does not hold it."""
        ...

    def adapter_digests(self, name: str, seed: int) -> dict[str, str]:
        """Probe digests of LoRA adapter ``name`` as the engine's LoRA kernels hold it, by
        PEFT tensor name (``weightsync.lora.adapter_digests``); ValueError where the engine
        cannot read back."""
        ...

    def close(self) -> None: ...


class DataPlane(Protocol):
    name: str

    def check_link(self, link: Link) -> None:
        """ValueError, without a request, for a link this engine cannot take: the source
        rank asks every engine before any of them joins."""
        ...

    def join(self, link: Link) -> Pending:
        """Ask the engine to join the transport (``check_link`` first). A broadcast join
        completes only once the trainer joined."""
        ...

    def validate(self, plan: Plan) -> None:
        """ValueError naming the first bad tensor: unknown to the engine's model, wrong
        shape or dtype, or missing from a full update."""
        ...

    def update_bucket(self, bucket: Bucket, ticket: Ticket) -> Pending: ...

    def open_staging(self, nbytes: int, bound: int) -> None:
        """Engine-side staging (``SyncConfig.engine_stage_bytes``): make room for an update
        of ``nbytes`` on every rank; refused past ``bound`` or what the host can hold."""
        ...

    def stage_bucket(self, bucket: Bucket, ticket: Ticket) -> Pending:
        """The bucket into the staging area while the engine generates; the model untouched."""
        ...

    # An engine that loads LoRA adapters from memory also has
    # ``load_adapter_tensors(name, tensors, config)`` (SGLang); the others read them from disk
    # (``ControlPlane.load_adapter``).

    def close(self) -> None: ...
