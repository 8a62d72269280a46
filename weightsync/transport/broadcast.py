"""Bucket broadcast over a dedicated torch.distributed group: NCCL on CUDA, gloo on CPU.

The trainer is rank 0 of the group and the only sender; every engine rank receives the whole
bucket (engines shard at load time). The group is built the way SGLang's engine builds its side
(``init_custom_process_group``): a TCP rendezvous hosted by rank 0, the store wrapped in
``PrefixStore(group_name)``, and ``_new_process_group_helper``. ``init_process_group`` would
prefix the store with "default_pg" instead, and the two sides would never meet.

Wire: one broadcast per bucket of its ``nbytes`` bytes as uint8, in the bucket's byte layout
(``weightsync.plan``), which is SGLang's ``flattened_bucket`` receive of ``bucket.names()``.
Two persistent staging buffers alternate, so the trainer fills bucket i+1 while bucket i is on
the wire; fresh buffers per bucket would cost more in page faults than the transfer itself.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from weightsync.config import DEFAULT_TIMEOUT_S
from weightsync.plan import Bucket, bucket_views
from weightsync.transport.base import Deadline, Ticket

NUM_SLOTS = 2


def init_weight_group(
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dist.ProcessGroup:
    """Join (rank 0: host) the weight-update group exactly as an SGLang engine joins it.

    All members must call this concurrently; it returns once all ``world_size`` ranks arrived.
    For NCCL, SGLang runs its processes with ``NCCL_CUMEM_ENABLE=0`` and ``NCCL_NVLS_ENABLE=0``;
    the trainer side gets the same defaults here (before the communicator is created lazily at
    the first broadcast) unless the caller set them.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if backend == "nccl":
        os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    host = f"[{master_address}]" if ":" in master_address else master_address
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        store = _host_store(master_address, master_port, world_size, timeout)
    else:
        store, _, _ = next(
            rendezvous(f"tcp://{host}:{master_port}", rank, world_size, timeout=timeout)
        )
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
        device_id=None,
    )
    # Group rank == "global" rank inside this group, as on the engine side.
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _host_store(address: str, port: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """The group's TCPStore, listening on ``address`` only: given just a port, TCPStore binds
    every interface, opening the weight group to the network when the engines are local."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return dist.TCPStore(
        address,
        port,
        world_size,
        is_master=True,
        timeout=timeout,
        multi_tenant=False,
        master_listen_fd=sock.detach(),  # the store owns the listening socket now
    )


def destroy_weight_group(group: dist.ProcessGroup) -> None:
    dist.destroy_process_group(group)


def _wait(work: dist.Work, deadline: Deadline, device: torch.device) -> None:
    if device.type == "cpu":
        try:
            work.wait(timeout=timedelta(seconds=max(deadline.left(), 1e-3)))
        except RuntimeError as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                raise deadline.expired() from e
            raise
        return
    # NCCL's wait() only orders streams; poll completion to get a host-side deadline.
    deadline.poll(work.is_completed)
    work.wait()


class _Staging:
    """Persistent per-slot uint8 buffers, grown (rarely) to the largest bucket seen."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.buffers = [torch.empty(0, dtype=torch.uint8, device=device)] * NUM_SLOTS
        self.capacity = capacity
        self.work: list[dist.Work | None] = [None] * NUM_SLOTS

    def get(self, slot: int, nbytes: int) -> torch.Tensor:
        if self.buffers[slot].numel() < nbytes:
            size = max(nbytes, self.capacity)
            self.buffers[slot] = torch.empty(size, dtype=torch.uint8, device=self.device)
        return self.buffers[slot][:nbytes]

    def wait(self, slot: int, deadline: Deadline) -> None:
        work, self.work[slot] = self.work[slot], None
        if work is not None:
            _wait(work, deadline, self.device)


class BroadcastSender:
    """Rank 0 of the weight group: async bucket broadcasts, two in flight."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        device: torch.device | str = "cpu",
        capacity_bytes: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if group.rank() != 0:
            raise ValueError(f"the sender must be rank 0 of the weight group, not {group.rank()}")
        self.group = group
        self.timeout_s = timeout_s
        self._staging = _Staging(torch.device(device), capacity_bytes)
        self._next_slot = 0
        self._slot_of: dict[int, int] = {}

    def buffers(self, bucket: Bucket) -> dict[torch.dtype, torch.Tensor]:
        slot = self._next_slot
        self._staging.wait(slot, Deadline(self.timeout_s, f"broadcast of slot {slot}"))
        self._next_slot = (slot + 1) % NUM_SLOTS
        self._slot_of[bucket.index] = slot
        return bucket_views(bucket, self._staging.get(slot, bucket.nbytes))

    def send(self, bucket: Bucket, buffers: dict[torch.dtype, torch.Tensor]) -> Ticket:
        slot = self._slot_of.pop(bucket.index, None)
        if slot is None:
            raise ValueError(f"bucket {bucket.index}: call buffers(bucket) before send")
        flat = self._staging.get(slot, bucket.nbytes)
        if any(
            b.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
            for b in buffers.values()
        ):
            raise ValueError(f"bucket {bucket.index}: send the buffers returned by buffers()")
        self._staging.work[slot] = dist.broadcast(
            flat, group_src=0, group=self.group, async_op=True
        )
        return Ticket(bucket.index, slot)

    def acknowledge(self, ticket: Ticket) -> None:
        """Nothing to do: a completed broadcast is its own acknowledgement."""

    def flush(self) -> None:
        deadline = Deadline(self.timeout_s, "broadcast flush")
        for slot in range(NUM_SLOTS):
            self._staging.wait(slot, deadline)

    def close(self) -> None:
        self.flush()
        self._staging = _Staging(self._staging.device, 0)


class BroadcastReceiver:
    """A non-zero rank of the weight group (our CPU engines, tests, benchmarks).

    ``recv`` posts the next bucket's receive (``Ticket.next_nbytes``) before it returns the
    current one to be loaded, so the sender's next broadcast is not held up by the load.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        device: torch.device | str = "cpu",
        capacity_bytes: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if group.rank() == 0:
            raise ValueError("rank 0 of the weight group is the sender, not a receiver")
        self.group = group
        self.timeout_s = timeout_s
        self._staging = _Staging(torch.device(device), capacity_bytes)
        self._busy: dict[int, int] = {}  # bucket index -> slot, until released

    def prefetch(self, bucket: Bucket, ticket: Ticket) -> None:
        self._post(bucket.index, bucket.nbytes)

    def _post(self, index: int, nbytes: int) -> None:
        if index in self._busy:
            return
        free = [s for s in range(NUM_SLOTS) if s not in self._busy.values()]
        if not free:
            raise RuntimeError(
                f"bucket {index}: both receive slots are held; release "
                f"buckets {sorted(self._busy)} first"
            )
        slot = free[0]
        self._staging.wait(slot, Deadline(self.timeout_s, f"receive into slot {slot}"))
        flat = self._staging.get(slot, nbytes)
        self._staging.work[slot] = dist.broadcast(
            flat, group_src=0, group=self.group, async_op=True
        )
        self._busy[index] = slot

    def recv(self, bucket: Bucket, ticket: Ticket) -> dict[torch.dtype, torch.Tensor]:
        self.prefetch(bucket, ticket)
        if ticket.next_nbytes:
            # Broadcasts on a group complete in order: posting the next one now lets its
            # bytes arrive while this bucket is loaded.
            self._post(bucket.index + 1, ticket.next_nbytes)
        slot = self._busy[bucket.index]
        self._staging.wait(slot, Deadline(self.timeout_s, f"receive of bucket {bucket.index}"))
        return bucket_views(bucket, self._staging.get(slot, bucket.nbytes))

    def release(self, ticket: Ticket) -> None:
        self._busy.pop(ticket.bucket_index, None)

    def close(self) -> None:
        self._busy.clear()
        self._staging = _Staging(self._staging.device, 0)
