"""What every transport does.

A weight update is a sequence of buckets (``weightsync.plan``). Metadata (the bucket layout and
a ``Ticket``) always travels ahead on a control channel: the engine adapter's HTTP request in
production, a pipe in tests and benchmarks. A transport moves only bytes.

Sender loop, per bucket::

    bufs = sender.buffers(bucket)           # a free staging area (waits, with a deadline)
    fill_bucket(bucket, bufs, named)        # weightsync.plan
    ticket = sender.send(bucket, bufs)      # handed off; may still be in flight
    control.send(bucket, ticket)            # receiver: recv(bucket, ticket) ... release(ticket)
    sender.acknowledge(ticket)              # once the receiver's reply came back, if it needs one
    ...
    sender.flush()                          # everything delivered, or TimeoutError
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from weightsync.plan import Bucket, Plan, fill_bucket


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a receiver needs, besides the bucket layout, to find one sent bucket's bytes."""

    bucket_index: int
    slot: int = -1
    """Staging/ring slot holding the bytes; -1 where the transport has none."""
    payloads: tuple[str, ...] = ()
    """Transport-specific handles: one serialized IPC payload per TP rank, a shard path ..."""
    next_nbytes: int = 0
    """Size of the bucket sent after this one (0: this is the last): a receiver can post that
    receive before it loads this bucket, so the next bytes move during the load."""


class Sender(Protocol):
    def buffers(self, bucket: Bucket) -> dict[torch.dtype, torch.Tensor]:
        """Flat per-dtype buffers to fill for ``bucket`` (waits until a staging slot is free)."""
        ...

    def send(self, bucket: Bucket, buffers: dict[torch.dtype, torch.Tensor]) -> Ticket:
        """Hand the filled buffers off; returns before delivery when the transport is async."""
        ...

    def acknowledge(self, ticket: Ticket) -> None:
        """The receiver released this bucket. A no-op for transports that see it themselves."""
        ...

    def flush(self) -> None:
        """Wait until every sent bucket is delivered; TimeoutError past the deadline."""
        ...

    def close(self) -> None: ...


class Receiver(Protocol):
    def recv(self, bucket: Bucket, ticket: Ticket) -> dict[torch.dtype, torch.Tensor]:
        """The bucket's per-dtype buffers (see ``unpack_bucket``), valid until ``release``;
        where the transport allows, the next bucket's receive (``ticket.next_nbytes``) is
        posted first."""
        ...

    def release(self, ticket: Ticket) -> None:
        """Done with the bucket's bytes; the sender may reuse its staging slot."""
        ...

    def close(self) -> None: ...


def send_stream(
    sender: Sender,
    plan: Plan,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    on_sent: Callable[[Bucket, Ticket], None],
    flush: bool = True,
) -> None:
    """Drive ``sender`` over a (name, tensor) stream that follows ``plan``'s order.

    ``on_sent`` ships each bucket's metadata to the receiver (and may acknowledge). Tensors are
    copied into staging buffers as they arrive, so at most two buckets' worth is held. Without
    ``flush`` the caller waits for delivery itself (e.g. on the receivers' answers first, which
    fail fast where a transport would wait out its deadline on a receiver that gave up).
    """
    stream = iter(named_tensors)
    for bucket in plan.buckets:
        bufs = sender.buffers(bucket)
        fill_bucket(bucket, bufs, itertools.islice(stream, bucket.num_tensors))
        on_sent(bucket, sender.send(bucket, bufs))
    extra = next(stream, None)
    if extra is not None:
        raise ValueError(f"tensor {extra[0]!r} is not in the plan (the stream is longer)")
    if flush:
        sender.flush()


class Deadline:
    """One deadline shared by the waits of one operation."""

    def __init__(self, timeout_s: float, what: str) -> None:
        self.end = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.what = what

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> TimeoutError:
        return TimeoutError(f"{self.what}: not done within {self.timeout_s:.1f} s")

    def poll(self, done: Callable[[], bool]) -> None:
        """Spin-then-sleep until ``done()``; raise TimeoutError at the deadline."""
        pause = 1e-5
        while not done():
            if time.monotonic() > self.end:
                raise self.expired()
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


@functools.cache
def host_tag() -> str:
    """8 hex digits naming this boot of this host and this pid namespace. Segments and temp
    dirs carry it, and a sweep touches only its own: on a /dev/shm or a file system shared
    with other hosts or containers, a pid that is dead here may be another one's live writer."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()  # noqa: SIM115
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        import socket

        boot, pidns = socket.gethostname(), 0
    return hashlib.sha256(f"{boot}:{pidns}".encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (segments and temp dirs of dead writers are swept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
