"""The JSON that travels in vLLM's ``/init_weight_transfer_engine`` and ``/update_weights``.

vLLM hands the dicts to ``init_info_cls(**d)`` / ``update_info_cls(**d)``, so the field names
are the wire format. A bucket travels as its ``weightsync.plan`` layout plus the transport's
``Ticket``; both sides rebuild the same ``Bucket`` from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from weightsync.config import DEFAULT_TIMEOUT_S
from weightsync.plan import Bucket, DtypeGroup, Slot
from weightsync.tensors import dtype_from_name, dtype_name
from weightsync.transport.base import Ticket

TRANSPORTS = ("broadcast", "shm", "sharded")


@dataclass
class InitInfo:
    """How the engine joins the transport; sent once per trainer connection."""

    transport: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    # broadcast: the trainer's weight group (weightsync.transport.broadcast.init_weight_group);
    # sharded: the same group with every trainer rank in it (weightsync.shard_transfer).
    master_address: str = ""
    master_port: int = 0
    world_size: int = 0
    rank_offset: int = 1
    """This engine's first rank in the group; worker w of the engine joins as offset + w."""
    group_name: str = ""
    senders: int = 1
    """sharded: the trainer's ranks (group ranks 0 .. senders - 1), the only ones that send."""
    # shm: the trainer's persistent ring (weightsync.transport.shm.RingSpec); worker w of the
    # engine is consumer consumer_index + w; the last consumer to attach unlinks the names.
    slot_names: list[str] = field(default_factory=list)
    slot_bytes: int = 0
    num_consumers: int = 1
    consumer_index: int = 0
    unlink: bool = False

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport={self.transport!r}: allowed {TRANSPORTS}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s!r}: must be > 0")
        if self.transport in ("broadcast", "sharded"):
            if not (self.master_address and self.master_port > 0 and self.group_name):
                raise ValueError(
                    f"{self.transport} needs master_address, master_port and group_name"
                )
            if not 0 < self.rank_offset < self.world_size:
                raise ValueError(
                    f"rank_offset={self.rank_offset} world_size={self.world_size}: the "
                    "trainer's ranks come first, engine workers after them"
                )
            if self.transport == "sharded" and not 0 < self.senders <= self.rank_offset:
                raise ValueError(
                    f"senders={self.senders}: the trainer's ranks come before rank_offset="
                    f"{self.rank_offset}"
                )
        elif not self.slot_names or self.slot_bytes <= 0:
            raise ValueError("shm needs slot_names and slot_bytes > 0")
        elif not 0 <= self.consumer_index < self.num_consumers:
            raise ValueError(
                f"consumer_index={self.consumer_index} not in [0, {self.num_consumers})"
            )
        if self.transport == "shm":
            from weightsync.transport.shm import RingSpec

            # The names come from the network: only ring names, checked before any open.
            RingSpec(tuple(self.slot_names), self.slot_bytes, self.num_consumers)


@dataclass
class UpdateInfo:
    """One bucket: ``groups`` items are ``{"dtype", "numel", "byte_offset", "entries":
    [[name, shape, offset, numel], ...]}`` as in ``weightsync.plan.DtypeGroup``."""

    groups: list[dict] = field(default_factory=list)
    bucket: int = 0
    nbytes: int = 0
    slot: int = -1
    payloads: list[str] = field(default_factory=list)
    next_nbytes: int = 0
    # sharded transport (weightsync.shard_transfer.engine_rounds): this round instead of a bucket
    pieces: list[list] = field(default_factory=list)
    ready: list[list] = field(default_factory=list)
    constants: list[list] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (self.groups or self.pieces or self.ready):
            raise ValueError(
                f"update_info {self.bucket}: neither a bucket (groups) nor a sharded round "
                "(pieces, ready)"
            )

    def to_bucket(self) -> tuple[Bucket, Ticket]:
        groups = []
        for g in self.groups:
            dtype = dtype_from_name(g["dtype"])
            if dtype is None:
                raise ValueError(f"bucket {self.bucket}: unknown dtype {g['dtype']!r}")
            slots = tuple(Slot(n, tuple(s), int(o), int(k)) for n, s, o, k in g["entries"])
            for s in slots:
                if math.prod(s.shape) != s.numel or not 0 <= s.offset <= g["numel"] - s.numel:
                    raise ValueError(
                        f"bucket {self.bucket}: tensor {s.name!r} (shape {list(s.shape)}, "
                        f"offset {s.offset}) does not fit its {g['numel']}-element group"
                    )
            groups.append(DtypeGroup(dtype, slots, int(g["numel"]), int(g["byte_offset"])))
        bucket = Bucket(self.bucket, tuple(groups), self.nbytes)
        return bucket, Ticket(self.bucket, self.slot, tuple(self.payloads), self.next_nbytes)


def update_info(bucket: Bucket, ticket: Ticket) -> UpdateInfo:
    groups = [
        {
            "dtype": dtype_name(g.dtype),
            "numel": g.numel,
            "byte_offset": g.byte_offset,
            "entries": [[s.name, list(s.shape), s.offset, s.numel] for s in g.entries],
        }
        for g in bucket.groups
    ]
    return UpdateInfo(
        groups, bucket.index, bucket.nbytes, ticket.slot, list(ticket.payloads), ticket.next_nbytes
    )
