"""A persistent shared-memory ring between the trainer and colocated CPU engine processes.

Fresh shared memory per bucket costs a page fault per 4 KiB on both sides (0.6 GiB/s here);
the same mappings reused run at memcpy speed. So the ring is created once: ``num_slots``
named segments in /dev/shm, mapped with MAP_POPULATE, and only their names (``RingSpec``) ever
cross to the consumers. Each segment is one page of header and ``slot_bytes`` of data:

    header int64[0] sent sequence   [1] bucket index   [2] bucket nbytes   [3] consumers
           int64[8 + i]             acknowledged sequence of consumer i

The producer fills a slot, bumps ``sent`` and tells consumers over the control channel; each
consumer reads the bucket straight out of the mapping and writes its ack word when done; the
producer reuses a slot once every ack word has caught up. Every wait has a deadline.

No /dev/shm entry outlives its use: the names are unlinked as soon as the consumers have
mapped them (the mappings stay valid), on close, by a finalizer, and, for a producer killed
before any of that, by the next ring created on this host (segments of dead pids).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import struct
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from weightsync.config import DEFAULT_TIMEOUT_S
from weightsync.plan import Bucket, bucket_views
from weightsync.transport.base import Deadline, Ticket, host_tag, pid_alive

SHM_DIR = Path("/dev/shm")
PREFIX = "wsync"
NAME = re.compile(rf"{PREFIX}-[0-9a-f]{{8}}-[0-9]+-[0-9a-f]{{12}}-[0-9]+")
"""The only names a ring has (``ShmRing.create``): names arrive over the network
(``/init_weight_transfer_engine``), so anything else is refused, never joined to a path."""
HEADER = mmap.PAGESIZE
_SENT, _INDEX, _NBYTES, _CONSUMERS, _ACK0 = 0, 1, 2, 3, 8
MAX_CONSUMERS = HEADER // 8 - _ACK0


@dataclass(frozen=True, slots=True)
class RingSpec:
    """Everything a consumer needs to map the ring; sent once."""

    names: tuple[str, ...]
    slot_bytes: int
    num_consumers: int

    def __post_init__(self) -> None:
        bad = [n for n in self.names if not (isinstance(n, str) and NAME.fullmatch(n))]
        if bad or not self.names:
            raise ValueError(
                f"RingSpec.names: ring segment names like 'wsync-<host8>-<pid>-<hex12>-<i>'"
                f", got {bad[:3] or 'none'}"
            )
        if self.slot_bytes <= 0 or not 1 <= self.num_consumers <= MAX_CONSUMERS:
            raise ValueError(
                f"RingSpec: slot_bytes={self.slot_bytes} must be > 0 and num_consumers="
                f"{self.num_consumers} in 1..{MAX_CONSUMERS}"
            )


@contextlib.contextmanager
def _shm_dir():
    """/dev/shm as a directory fd: names are opened and unlinked relative to it."""
    fd = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _unlink(name: str) -> None:
    with _shm_dir() as d, contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=d)


def sweep_dead_segments() -> list[str]:
    """Unlink ring segments of this host (``host_tag``) whose creating process no longer
    exists; return their names."""
    swept = []
    for path in SHM_DIR.glob(f"{PREFIX}-{host_tag()}-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            _unlink(path.name)
            swept.append(path.name)
    return swept


class _Segment:
    def __init__(self, name: str, size: int, create: bool) -> None:
        # Never through a link: a name planted as a symlink would map another file.
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
        with _shm_dir() as d:
            fd = os.open(name, flags, 0o600, dir_fd=d)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"shm segment {name}: not a regular file")
            if create:
                # Allocate the tmpfs pages now: a sparse file would fault on every first write.
                os.posix_fallocate(fd, 0, size)
            elif os.fstat(fd).st_size != size:
                raise ValueError(f"shm segment {name}: size {os.fstat(fd).st_size} != {size}")
            populate = getattr(mmap, "MAP_POPULATE", 0)
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | populate)
        finally:
            os.close(fd)
        self.data = torch.frombuffer(self.mm, dtype=torch.uint8, offset=HEADER)

    def get(self, field: int) -> int:
        return struct.unpack_from("<q", self.mm, 8 * field)[0]

    def set(self, field: int, value: int) -> None:
        struct.pack_into("<q", self.mm, 8 * field, value)

    def close(self) -> None:
        del self.data
        with contextlib.suppress(BufferError):  # a caller still holds views: GC unmaps later
            self.mm.close()


class ShmRing:
    """Producer (``create``) or consumer (``attach``) side of the mapped segments."""

    def __init__(self, spec: RingSpec, segments: list[_Segment], owner: bool) -> None:
        self.spec = spec
        self.segments = segments
        self._unlinker = weakref.finalize(self, _unlink_all, spec.names) if owner else None

    @classmethod
    def create(cls, slot_bytes: int, num_slots: int = 2, num_consumers: int = 1) -> ShmRing:
        if slot_bytes <= 0 or num_slots < 2 or not 1 <= num_consumers <= MAX_CONSUMERS:
            raise ValueError(
                f"ShmRing(slot_bytes={slot_bytes}, num_slots={num_slots}, num_consumers="
                f"{num_consumers}): need slot_bytes > 0, >= 2 slots, 1..{MAX_CONSUMERS} consumers"
            )
        sweep_dead_segments()
        token = uuid.uuid4().hex[:12]
        names = tuple(f"{PREFIX}-{host_tag()}-{os.getpid()}-{token}-{i}" for i in range(num_slots))
        spec = RingSpec(names, slot_bytes, num_consumers)
        segments: list[_Segment] = []
        try:
            for name in names:
                segments.append(_Segment(name, HEADER + slot_bytes, create=True))
                segments[-1].set(_CONSUMERS, num_consumers)
        except BaseException:
            for seg in segments:
                seg.close()
            _unlink_all(names)
            raise
        return cls(spec, segments, owner=True)

    @classmethod
    def attach(cls, spec: RingSpec, unlink: bool = False) -> ShmRing:
        """Map the ring; ``unlink=True`` (the last consumer to attach) removes the names."""
        segments = [_Segment(n, HEADER + spec.slot_bytes, create=False) for n in spec.names]
        if unlink:
            _unlink_all(spec.names)
        return cls(spec, segments, owner=False)

    def unlink(self) -> None:
        """Remove the names from /dev/shm (mappings stay valid); idempotent."""
        _unlink_all(self.spec.names)

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        self.segments = []
        if self._unlinker is not None:
            self._unlinker()


def _unlink_all(names: tuple[str, ...]) -> None:
    for name in names:
        _unlink(name)


class ShmSender:
    """Producer side of the ring (the Sender protocol)."""

    def __init__(self, ring: ShmRing, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.ring = ring
        self.timeout_s = timeout_s
        self._next_slot = 0
        self._slot_of: dict[int, int] = {}

    def _acked(self, slot: int) -> bool:
        seg = self.ring.segments[slot]
        sent = seg.get(_SENT)
        return all(seg.get(_ACK0 + i) == sent for i in range(self.ring.spec.num_consumers))

    def buffers(self, bucket: Bucket) -> dict[torch.dtype, torch.Tensor]:
        if bucket.nbytes > self.ring.spec.slot_bytes:
            raise ValueError(
                f"bucket {bucket.index} needs {bucket.nbytes} bytes but ring slots hold "
                f"{self.ring.spec.slot_bytes}; create the ring with plan.max_bucket_nbytes"
            )
        slot = self._next_slot
        Deadline(self.timeout_s, f"consumers' ack of ring slot {slot}").poll(
            lambda: self._acked(slot)
        )
        self._next_slot = (slot + 1) % len(self.ring.segments)
        self._slot_of[bucket.index] = slot
        return bucket_views(bucket, self.ring.segments[slot].data)

    def send(self, bucket: Bucket, buffers: dict[torch.dtype, torch.Tensor]) -> Ticket:
        slot = self._slot_of.pop(bucket.index, None)
        if slot is None:
            raise ValueError(f"bucket {bucket.index}: call buffers(bucket) before send")
        seg = self.ring.segments[slot]
        seg.set(_INDEX, bucket.index)
        seg.set(_NBYTES, bucket.nbytes)
        seg.set(_SENT, seg.get(_SENT) + 1)  # last: publishes the slot
        return Ticket(bucket.index, slot)

    def acknowledge(self, ticket: Ticket) -> None:
        """Nothing to do: consumers acknowledge in the slot header."""

    def flush(self) -> None:
        deadline = Deadline(self.timeout_s, "ring flush")
        for slot in range(len(self.ring.segments)):
            deadline.poll(lambda s=slot: self._acked(s))

    def close(self) -> None:
        self.ring.close()


class ShmReceiver:
    """Consumer ``consumer_index`` of the ring (the Receiver protocol); reads in place."""

    def __init__(self, ring: ShmRing, consumer_index: int = 0) -> None:
        if not 0 <= consumer_index < ring.spec.num_consumers:
            raise ValueError(
                f"consumer_index={consumer_index} is not in [0, {ring.spec.num_consumers})"
            )
        self.ring = ring
        self.consumer_index = consumer_index

    def recv(self, bucket: Bucket, ticket: Ticket) -> dict[torch.dtype, torch.Tensor]:
        seg = self.ring.segments[ticket.slot]
        index, nbytes = seg.get(_INDEX), seg.get(_NBYTES)
        if (index, nbytes) != (bucket.index, bucket.nbytes):
            raise ValueError(
                f"ring slot {ticket.slot} holds bucket {index} ({nbytes} B), "
                f"expected bucket {bucket.index} ({bucket.nbytes} B)"
            )
        return bucket_views(bucket, seg.data)

    def release(self, ticket: Ticket) -> None:
        # The loads out of the slot finished before this store (program order; x86 keeps
        # stores after earlier loads), so the producer never overwrites bytes still being read.
        seg = self.ring.segments[ticket.slot]
        seg.set(_ACK0 + self.consumer_index, seg.get(_SENT))

    def close(self) -> None:
        self.ring.close()
