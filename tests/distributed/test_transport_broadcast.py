"""Broadcast transport across real processes over gloo, group built SGLang's way."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks.channel import BucketMsg, DoneMsg, PipeChannel, PlanMsg
from tests.distributed.test_transport_base import (
    CTX,
    make_tensor,
    mismatches,
    mixed_metas,
    run_workers,
)
from weightsync.net import free_port
from weightsync.plan import build_plan, unpack_bucket
from weightsync.plan_checks import check_plan_identical
from weightsync.transport.base import send_stream
from weightsync.transport.broadcast import (
    BroadcastReceiver,
    BroadcastSender,
    destroy_weight_group,
    init_weight_group,
)

pytestmark = pytest.mark.slow
SEEDS = (1, 2)  # two updates through the same persistent buffers
BUCKET_BYTES = 4096


def _sender(port: int, conns: list, via_ticket: bool) -> dict:
    world = 1 + len(conns)
    group = init_weight_group("127.0.0.1", port, world, 0, "wsync_test", "gloo", timeout_s=60)
    channels = [PipeChannel(c, timeout_s=60) for c in conns]
    plan = build_plan(mixed_metas(), bucket_bytes=BUCKET_BYTES)
    sender = BroadcastSender(group, capacity_bytes=plan.max_bucket_nbytes, timeout_s=60)
    staging = set()
    for seed in SEEDS:
        for channel in channels:
            channel.put(PlanMsg(plan, version=str(seed)))
        stream = ((m.name, make_tensor(m, seed)) for m in mixed_metas())

        def on_sent(bucket, ticket):
            staging.add(sender._staging.buffers[ticket.slot].data_ptr())
            following = plan.buckets[bucket.index + 1 : bucket.index + 2]
            if via_ticket and following:  # as WeightSender tells the engines
                ticket = replace(ticket, next_nbytes=following[0].nbytes)
            for channel in channels:
                channel.put(BucketMsg(bucket, ticket))

        send_stream(sender, plan, stream, on_sent)
        for channel in channels:
            channel.put(DoneMsg(len(plan.buckets)))
    sender.close()
    destroy_weight_group(group)
    return {"buckets": len(plan.buckets), "staging_buffers": len(staging)}


def _receiver(port: int, conn, rank: int, world: int, via_ticket: bool) -> dict:
    group = init_weight_group("127.0.0.1", port, world, rank, "wsync_test", "gloo", timeout_s=60)
    channel = PipeChannel(conn, timeout_s=60)
    receiver = BroadcastReceiver(group, timeout_s=60)
    report = {"bad": [], "received": 0, "posted_ahead": 0}
    for _ in SEEDS:
        plan_msg = channel.get()
        assert isinstance(plan_msg, PlanMsg)
        seed, msg = int(plan_msg.version), channel.get()
        while isinstance(msg, BucketMsg):
            bufs = receiver.recv(msg.bucket, msg.ticket)
            report["posted_ahead"] += msg.bucket.index + 1 in receiver._busy
            following = channel.get()
            if isinstance(following, BucketMsg) and not via_ticket:
                receiver.prefetch(following.bucket, following.ticket)  # before "loading"
            named = unpack_bucket(msg.bucket, bufs)
            report["bad"] += mismatches(named, mixed_metas(), seed)
            report["received"] += len(named)
            receiver.release(msg.ticket)
            msg = following
        assert msg == DoneMsg(len(plan_msg.plan.buckets))
    receiver.close()
    destroy_weight_group(group)
    return report


@pytest.mark.parametrize(
    ("receivers", "via_ticket"),
    [(1, False), (2, False), (2, True)],
    ids=["2-procs", "3-procs", "3-procs-next-in-ticket"],
)
def test_broadcast_round_trip_bit_exact_mixed_dtypes(receivers, via_ticket):
    pipes = [CTX.Pipe() for _ in range(receivers)]
    port, world = free_port(), 1 + receivers
    jobs = [(_sender, (port, [a for a, _ in pipes], via_ticket))]
    jobs += [(_receiver, (port, b, r + 1, world, via_ticket)) for r, (_, b) in enumerate(pipes)]
    sent, *got = run_workers(jobs)
    metas = mixed_metas()
    assert sent["buckets"] > 3  # several buckets, so both staging slots and prefetch are used
    assert sent["staging_buffers"] == 2  # persistent: the second update reused them
    # With the next size in the ticket, recv posts every following bucket's receive itself.
    ahead = len(SEEDS) * (sent["buckets"] - 1) if via_ticket else 0
    want = {"bad": [], "received": len(SEEDS) * len(metas), "posted_ahead": ahead}
    assert got == [want] * receivers
    assert {m.dtype for m in metas} == {torch.bfloat16, torch.float32, torch.int32, torch.int64}


def _check_plans(port: int, rank: int, num_layers: int) -> str:
    group = init_weight_group("127.0.0.1", port, 2, rank, "wsync_plan_check", "gloo", timeout_s=60)
    same = build_plan(mixed_metas(2), bucket_bytes=BUCKET_BYTES)
    check_plan_identical(same, group)  # identical plans pass
    mine = build_plan(mixed_metas(num_layers), bucket_bytes=BUCKET_BYTES)
    try:
        check_plan_identical(mine, group)
    except ValueError as e:
        return str(e)
    finally:
        destroy_weight_group(group)
    return "no error"


def test_plan_mismatch_raises_on_every_rank_naming_the_rank():
    port = free_port()
    errors = run_workers([(_check_plans, (port, 0, 2)), (_check_plans, (port, 1, 3))])
    for err in errors:
        assert "bucket plans differ across sending ranks: ranks [1] differ from rank 0" in err
    assert "rank 1 has" in errors[0] and "buckets, rank 0 has" in errors[0]


def test_the_weight_groups_store_listens_only_on_the_given_address():
    import psutil

    from weightsync.net import free_port
    from weightsync.transport.broadcast import destroy_weight_group, init_weight_group

    port = free_port()
    group = init_weight_group("127.0.0.1", port, 1, 0, "ws-bind-test", timeout_s=10)
    try:
        listening = [c.laddr for c in psutil.Process().net_connections() if c.status == "LISTEN"]
        store = [a for a in listening if a.port == port]
        assert [a.ip for a in store] == ["127.0.0.1"], listening  # not 0.0.0.0 / ::
    finally:
        destroy_weight_group(group)
