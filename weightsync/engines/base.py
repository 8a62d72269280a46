"""What the orchestrator needs from an inference engine during one weight update.

One update, for every engine of the fleet::

    engine.validate(plan, named)     # before anything is paused: ValueError names the tensor
    engine.pause(mode); engine.flush_cache()
    engine.begin_update()
    for bucket in plan.buckets:      # metadata over the engine's HTTP API, bytes by transport
        pending = engine.update_bucket(bucket, ticket)
        ... transport sends / has sent the bytes ...
        pending.wait(timeout_s)      # the engine's acknowledgement; the slot is free again
    engine.end_update()              # engine post-processing (e.g. the int4 repack)
    engine.set_version(version); engine.resume()

Adapters speak their engine's own HTTP RL API; nothing here imports an engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import torch

from weightsync.plan import Bucket, Plan
from weightsync.transport.base import Ticket


class Pending(Protocol):
    def wait(self, timeout_s: float) -> None:
        """Block until the engine acknowledged the bucket; TimeoutError past the deadline,
        RuntimeError carrying the engine's error text if it failed."""
        ...

    def done(self) -> bool:
        """The engine answered (``wait`` returns or raises at once)."""
        ...


class Engine(Protocol):
    name: str

    def health(self) -> bool: ...

    def validate(
        self, plan: Plan, named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None
    ) -> None:
        """ValueError naming the first bad tensor: unknown to the engine's model, wrong
        shape or dtype, missing from a full update, or (when tensors are given) not finite."""
        ...

    def pause(self, mode: str) -> None: ...

    def flush_cache(self) -> bool:
        """Drop cached prefixes computed with the old weights; False if the engine refused."""
        ...

    def begin_update(self) -> None: ...

    def update_bucket(self, bucket: Bucket, ticket: Ticket) -> Pending: ...

    def end_update(self) -> None: ...

    def abort_update(self) -> None:
        """Close a session that an update could not finish, leaving a model that can serve
        (a stale one); a no-op when no session is open."""
        ...

    def model_config(self) -> dict | None:
        """The served model's config fields (``weightsync.model_config.summary``), or None
        where the engine cannot tell."""
        ...

    def set_version(self, version: str) -> None: ...

    def get_version(self) -> str | None: ...

    def resume(self) -> None: ...

    def check_weights(self, expected: Mapping[str, torch.Tensor]) -> list[str]:
        """Names whose engine-side copy differs from ``expected`` (empty: all equal)."""
        ...
