"""Same-host transports across real processes: shared-memory ring and SGLang IPC payloads."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from benchmarks.channel import AckMsg, BucketMsg, DoneMsg, PipeChannel, PlanMsg, SetupMsg
from tests.distributed.test_transport_base import (
    CTX,
    make_tensor,
    mismatches,
    mixed_metas,
    run_workers,
)
from weightsync.plan import build_plan, unpack_bucket
from weightsync.transport.base import Ticket, host_tag, send_stream
from weightsync.transport.ipc import IpcPayloadReceiver, IpcPayloadSender
from weightsync.transport.shm import (
    SHM_DIR,
    RingSpec,
    ShmReceiver,
    ShmRing,
    ShmSender,
    sweep_dead_segments,
)

SEEDS = (3, 4)
BUCKET_BYTES = 4096


def _segments_of(pid: int) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"wsync-{host_tag()}-{pid}-*"))


def _ring_sender(conn) -> dict:
    channel = PipeChannel(conn, timeout_s=60)
    plan = build_plan(mixed_metas(), bucket_bytes=BUCKET_BYTES)
    ring = ShmRing.create(plan.max_bucket_nbytes)
    channel.put(PlanMsg(plan, version="ring"))
    channel.put(SetupMsg(ring.spec))
    assert isinstance(channel.get(), AckMsg)  # the consumer mapped (and unlinked) the ring
    names_left = [n for n in ring.spec.names if (SHM_DIR / n).exists()]
    sender = ShmSender(ring, timeout_s=60)
    for seed in SEEDS:
        stream = ((m.name, make_tensor(m, seed)) for m in mixed_metas())
        send_stream(sender, plan, stream, lambda b, t: channel.put(BucketMsg(b, t)))
        channel.put(DoneMsg(len(plan.buckets)))
    sender.close()
    return {"names_left_after_attach": names_left, "segments_after": _segments_of(os.getpid())}


def _ring_receiver(conn) -> dict:
    channel = PipeChannel(conn, timeout_s=60)
    plan = channel.get().plan
    spec = channel.get().spec
    assert isinstance(spec, RingSpec)
    receiver = ShmReceiver(ShmRing.attach(spec, unlink=True))
    channel.put(AckMsg(Ticket(-1)))
    report = {"bad": [], "received": 0}
    for seed in SEEDS:
        for msg in iter(channel.get, DoneMsg(len(plan.buckets))):
            named = unpack_bucket(msg.bucket, receiver.recv(msg.bucket, msg.ticket))
            report["bad"] += mismatches(named, mixed_metas(), seed)
            report["received"] += len(named)
            receiver.release(msg.ticket)
    receiver.close()
    return report


@pytest.mark.slow
def test_shm_ring_round_trip_bit_exact_and_leaves_no_segments():
    a, b = CTX.Pipe()
    sent, got = run_workers([(_ring_sender, (a,)), (_ring_receiver, (b,))])
    assert got == {"bad": [], "received": len(SEEDS) * len(mixed_metas())}
    assert sent == {"names_left_after_attach": [], "segments_after": []}


def test_shm_ring_unlinks_on_failure_and_refuses_oversized_buckets():
    plan = build_plan(mixed_metas(1), bucket_bytes=BUCKET_BYTES)
    with pytest.raises(ValueError, match=r"bucket 0 needs \d+ bytes but ring slots hold 64"):
        sender = ShmSender(ShmRing.create(64), timeout_s=1)
        try:
            assert len(_segments_of(os.getpid())) == 2
            sender.buffers(plan.buckets[0])
        finally:
            sender.close()
    assert _segments_of(os.getpid()) == []
    with pytest.raises(ValueError, match="need slot_bytes > 0, >= 2 slots"):
        ShmRing.create(1024, num_slots=1)


def test_shm_ring_waits_for_acks_with_a_deadline():
    plan = build_plan(mixed_metas(1), bucket_bytes=BUCKET_BYTES)
    ring = ShmRing.create(plan.max_bucket_nbytes)
    consumer = ShmReceiver(ShmRing.attach(ring.spec))
    sender = ShmSender(ring, timeout_s=0.2)
    try:
        tickets = [sender.send(b, sender.buffers(b)) for b in plan.buckets[:2]]
        with pytest.raises(TimeoutError, match=r"ack of ring slot 0: not done within 0\.2 s"):
            sender.buffers(plan.buckets[2])  # both slots are still held by the consumer
        with pytest.raises(ValueError, match="ring slot 1 holds bucket 1"):
            consumer.recv(plan.buckets[0], tickets[1])
        consumer.release(tickets[0])
        sender.buffers(plan.buckets[2])  # slot 0 is free again
    finally:
        consumer.close()
        sender.close()
    assert _segments_of(os.getpid()) == []


def _create_ring_and_die() -> None:
    ring = ShmRing.create(4096)
    assert ring.segments
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_segments_of_a_killed_producer_are_swept():
    proc = CTX.Process(target=_create_ring_and_die)
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL
    leaked = _segments_of(proc.pid)
    assert len(leaked) == 2  # SIGKILL skips every finalizer ...
    assert sorted(sweep_dead_segments()) == leaked  # ... so the next ring sweeps them
    assert _segments_of(proc.pid) == []


def _payload_sender(conn) -> dict:
    channel = PipeChannel(conn, timeout_s=60)
    plan = build_plan(mixed_metas(), bucket_bytes=BUCKET_BYTES)
    sender = IpcPayloadSender("cpu", tp_size=3)
    channel.put(PlanMsg(plan))
    max_alive = 0

    def ship(bucket, ticket):
        nonlocal max_alive
        channel.put(BucketMsg(bucket, ticket))
        max_alive = max(max_alive, len(sender.unacknowledged))
        ack = channel.get()  # the engine's reply: it has loaded (or refused) the bucket
        sender.acknowledge(ack.ticket)

    stream = ((m.name, make_tensor(m, SEEDS[0])) for m in mixed_metas())
    send_stream(sender, plan, stream, ship)
    channel.put(DoneMsg(len(plan.buckets)))
    return {"max_alive": max_alive, "left": sender.unacknowledged}


def _sglang_load(payload: str) -> list:
    """What SGLang's WeightUpdater does with a flattened_bucket payload, with its own classes."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    obj = MultiprocessingSerializer.deserialize(payload)
    metadata = [
        FlattenedTensorMetadata(m.name, m.shape, m.dtype, m.start_idx, m.end_idx, m.numel)
        for m in obj["metadata"]
    ]
    bucket = FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"], metadata=metadata)
    return bucket.reconstruct_tensors()


def _payload_receiver(conn) -> dict:
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()  # as SGLang's scheduler does before deserializing
    channel = PipeChannel(conn, timeout_s=60)
    plan = channel.get().plan
    receiver = IpcPayloadReceiver(tp_rank=0)
    report = {"bad": [], "received": 0, "refused": []}
    for msg in iter(channel.get, DoneMsg(len(plan.buckets))):
        assert len(msg.ticket.payloads) == 3 and isinstance(msg.ticket.payloads[0], str)
        report["bad"] += mismatches(_sglang_load(msg.ticket.payloads[2]), mixed_metas(), SEEDS[0])
        other = plan.buckets[(msg.bucket.index + 1) % len(plan.buckets)]
        try:  # TP rank 1's payload checked against the wrong bucket: refused before loading
            IpcPayloadReceiver(tp_rank=1).recv(other, msg.ticket)
        except ValueError as e:
            report["refused"].append(str(e).split(":")[0])
        named = unpack_bucket(msg.bucket, receiver.recv(msg.bucket, msg.ticket))
        report["bad"] += mismatches(named, mixed_metas(), SEEDS[0])
        report["received"] += len(named)
        receiver.release(msg.ticket)
        channel.put(AckMsg(msg.ticket))
    return report


@pytest.mark.slow
def test_cpu_flattened_bucket_payload_opens_with_sglangs_deserializer():
    pytest.importorskip("sglang.srt.utils")
    a, b = CTX.Pipe()
    sent, got = run_workers([(_payload_sender, (a,)), (_payload_receiver, (b,))])
    plan = build_plan(mixed_metas(), bucket_bytes=BUCKET_BYTES)
    assert got["bad"] == [] and got["received"] == len(mixed_metas())  # ours and SGLang's load
    assert got["refused"] == [f"bucket {(b.index + 1) % len(plan.buckets)}" for b in plan.buckets]
    assert sent == {"max_alive": 1, "left": []}


def _have_sglang() -> bool:
    try:
        import sglang.srt.utils  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda_payload_sender(conn, with_sglang: bool) -> None:
    channel = PipeChannel(conn, timeout_s=120)
    plan = build_plan(mixed_metas(), bucket_bytes=BUCKET_BYTES)
    sender = IpcPayloadSender("cuda", tp_size=1, uuid_devices=with_sglang)
    channel.put(PlanMsg(plan))
    stream = ((m.name, make_tensor(m, SEEDS[1]).cuda()) for m in mixed_metas())

    def ship(bucket, ticket):
        channel.put(BucketMsg(bucket, ticket))
        sender.acknowledge(channel.get().ticket)

    send_stream(sender, plan, stream, ship)
    channel.put(DoneMsg(len(plan.buckets)))
    sender.close()


def _cuda_payload_receiver(conn, with_sglang: bool) -> dict:
    channel = PipeChannel(conn, timeout_s=120)
    plan = channel.get().plan
    receiver = IpcPayloadReceiver(tp_rank=0, device="cuda", safe=with_sglang)
    report = {"bad": [], "received": 0, "devices": set()}
    for msg in iter(channel.get, DoneMsg(len(plan.buckets))):
        named = unpack_bucket(msg.bucket, receiver.recv(msg.bucket, msg.ticket))
        report["devices"] |= {t.device.type for _, t in named}
        report["bad"] += mismatches([(n, t.cpu()) for n, t in named], mixed_metas(), SEEDS[1])
        report["received"] += len(named)
        receiver.release(msg.ticket)
        channel.put(AckMsg(msg.ticket))
    return report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ipc_payload_round_trip_bit_exact():
    # Without sglang (a bare GPU box) the same payloads go through plain pickle and torch's
    # own device numbering; with it, through SGLang's SafeUnpickler and UUID device mapping.
    with_sglang = _have_sglang()
    print(f"CUDA IPC round trip {'with' if with_sglang else 'WITHOUT'} sglang's unpickler")
    a, b = CTX.Pipe()
    _, got = run_workers(
        [(_cuda_payload_sender, (a, with_sglang)), (_cuda_payload_receiver, (b, with_sglang))]
    )
    assert got == {"bad": [], "received": len(mixed_metas()), "devices": {"cuda"}}


@pytest.mark.parametrize(
    "name",
    [
        "../../tmp/victim",
        "/tmp/victim",
        "wsync-0123abcd-1-zz-0",
        "wsync-0123abcd-1-0123456789ab-0/../x",
        "",
    ],
)
def test_ring_names_other_than_ours_are_refused_before_any_open(tmp_path, name):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    with pytest.raises(ValueError, match=r"RingSpec\.names"):
        ShmRing.attach(RingSpec((name,), 4096, 1), unlink=True)
    assert victim.read_bytes() == b"keep"


def test_a_ring_name_planted_as_a_symlink_is_not_followed(tmp_path):
    import errno

    victim = tmp_path / "victim"
    victim.write_bytes(b"k" * (4096 + 8192))
    name = f"wsync-{host_tag()}-{os.getpid()}-0123456789ab-0"
    (SHM_DIR / name).symlink_to(victim)
    try:
        with pytest.raises(OSError) as info:
            ShmRing.attach(RingSpec((name,), 8192, 1), unlink=True)
        assert info.value.errno == errno.ELOOP
    finally:
        (SHM_DIR / name).unlink()
    assert victim.read_bytes() == b"k" * (4096 + 8192)


def test_sweeps_leave_segments_of_other_hosts_alone():
    dead = 2**22 + 17  # above pid_max's default: no such process here
    ours = SHM_DIR / f"wsync-{host_tag()}-{dead}-0123456789ab-0"
    theirs = (
        SHM_DIR / f"wsync-{'f' * 8 if host_tag() != 'f' * 8 else 'e' * 8}-{dead}-0123456789ab-0"
    )
    for p in (ours, theirs):
        p.write_bytes(b"x")
    try:
        swept = sweep_dead_segments()
        assert ours.name in swept and not ours.exists()
        assert theirs.exists(), "another host's (or container's) ring is not ours to judge"
    finally:
        for p in (ours, theirs):
            p.unlink(missing_ok=True)
