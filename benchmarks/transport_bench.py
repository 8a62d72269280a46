"""Transport throughput against the raw primitive moving the same bytes, in one run.

    python -m benchmarks.transport_bench [--total-mib 512] [--bucket-mib 64] [--repeats 3]
    python -m benchmarks.transport_bench --cuda     # CUDA IPC payloads vs a device copy

- broadcast: BroadcastSender/Receiver (fill staging, async bucket broadcasts, 2 in flight)
  vs raw gloo ``broadcast`` of persistent buffers of the same sizes, 2 processes;
- shm: ShmSender fill + ShmReceiver copy-out into the consumer's tensors vs one ``copy_`` of
  the same bytes (the ring moves them twice: in and out);
- disk: DiskStore write+commit (fsync) and verify+read;
- cuda (--cuda): IpcPayloadSender -> consumer process copying into its tensors vs ``copy_``.
Each number is the median over ``--repeats`` after one warm-up; ratios are transport / raw.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.channel import AckMsg, BucketMsg, DoneMsg, PipeChannel, SetupMsg
from weightsync.config import MiB
from weightsync.net import free_port
from weightsync.plan import TensorMeta, build_plan, unpack_bucket
from weightsync.transport.base import Ticket, send_stream

CTX = mp.get_context("spawn")
GiB = 1 << 30


def model_metas(total_mib: int) -> list[TensorMeta]:
    """Layers of a bf16 weight, an int4-packed weight (int32 + bf16 scales) and an fp32 norm."""
    metas, i = [], 0
    while sum(m.dtype.itemsize * torch.Size(m.shape).numel() for m in metas) < total_mib * MiB:
        p = f"model.layers.{i}"
        metas += [
            TensorMeta(f"{p}.mlp.weight", torch.bfloat16, (2048, 1024), f"{p}.mlp"),
            TensorMeta(f"{p}.q.weight_packed", torch.int32, (1024, 128), f"{p}.q"),
            TensorMeta(f"{p}.q.weight_scale", torch.bfloat16, (1024, 8), f"{p}.q"),
            TensorMeta(f"{p}.norm.weight", torch.float32, (1024,), f"{p}.norm"),
        ]
        i += 1
    return metas


def make_tensors(metas, device="cpu"):
    return [(m.name, torch.ones(m.shape, dtype=m.dtype, device=device)) for m in metas]


def setup(args) -> None:
    """Each process's intra-op threads: two processes with all cores each spin against each
    other in every parallel copy, so the benchmark gives each its share when asked."""
    if args.threads:
        torch.set_num_threads(args.threads)


def bucket_spans(plan) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(b.nbytes for b in plan.buckets))
    return list(zip([0, *ends[:-1]], ends, strict=True))


def local_copies(plan, named, params, device="cpu") -> float:
    """The copies a transport makes (fill a flat buffer, copy each tensor out), in-process."""
    from weightsync.plan import bucket_views, fill_bucket

    flat = torch.empty(plan.max_bucket_nbytes, dtype=torch.uint8, device=device)
    it = iter(named)
    t0 = time.perf_counter()
    for bucket in plan.buckets:
        bufs = bucket_views(bucket, flat)
        fill_bucket(bucket, bufs, [next(it) for _ in range(bucket.num_tensors)])
        for name, t in unpack_bucket(bucket, bufs):
            params[name].copy_(t)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_rate(times: list[float], nbytes: int) -> tuple[float, float]:
    t = statistics.median(times)
    return t, nbytes / t / GiB


def _bcast_peer(rank, port, conn, args, out):
    setup(args)
    from weightsync.transport.broadcast import (
        BroadcastReceiver,
        BroadcastSender,
        init_weight_group,
    )

    group = init_weight_group("127.0.0.1", port, 2, rank, "bench", "gloo", timeout_s=600)
    plan = build_plan(model_metas(args.total_mib), args.bucket_mib * MiB)
    channel = PipeChannel(conn, timeout_s=600)
    raw = [torch.ones(b.nbytes, dtype=torch.uint8) for b in plan.buckets[:2]]
    named = make_tensors(model_metas(args.total_mib))
    times = {"raw": [], "transport": []}
    sender = BroadcastSender(group, capacity_bytes=plan.max_bucket_nbytes) if rank == 0 else None
    receiver = BroadcastReceiver(group, capacity_bytes=plan.max_bucket_nbytes) if rank else None
    for _ in range(args.repeats + 1):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        works = [dist.broadcast(raw[i % 2][: b.nbytes], group_src=0, group=group, async_op=True)
                 for i, b in enumerate(plan.buckets)]  # fmt: skip
        for w in works:
            w.wait()
        dist.barrier(group=group)
        times["raw"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if rank == 0:
            send_stream(sender, plan, named, lambda b, t: channel.put(BucketMsg(b, t)))
            channel.put(DoneMsg(len(plan.buckets)))
        else:
            for msg in iter(channel.get, DoneMsg(len(plan.buckets))):
                unpack_bucket(msg.bucket, receiver.recv(msg.bucket, msg.ticket))
                receiver.release(msg.ticket)
        dist.barrier(group=group)
        times["transport"].append(time.perf_counter() - t0)
    if rank == 0:
        out.put({k: v[1:] for k, v in times.items()} | {"nbytes": plan.total_nbytes})


def bench_broadcast(args) -> dict:
    port, (a, b), out = free_port(), CTX.Pipe(), CTX.Queue()
    procs = [
        CTX.Process(target=_bcast_peer, args=(r, port, c, args, out)) for r, c in [(0, a), (1, b)]
    ]
    for p in procs:
        p.start()
    res = out.get(timeout=900)
    for p in procs:
        p.join(timeout=60)
    return res


def _shm_consumer(conn, args):
    setup(args)
    from weightsync.transport.shm import ShmReceiver, ShmRing

    channel = PipeChannel(conn, timeout_s=600)
    receiver = ShmReceiver(ShmRing.attach(channel.get().spec, unlink=True))
    plan = build_plan(model_metas(args.total_mib), args.bucket_mib * MiB)
    params = dict(make_tensors(model_metas(args.total_mib)))  # the engine's weights
    channel.put(AckMsg(Ticket(-1)))
    for _ in range(args.repeats + 1):
        for msg in iter(channel.get, DoneMsg(len(plan.buckets))):
            for name, t in unpack_bucket(msg.bucket, receiver.recv(msg.bucket, msg.ticket)):
                params[name].copy_(t)
            receiver.release(msg.ticket)
        channel.put(AckMsg(Ticket(len(plan.buckets))))
    receiver.close()


def bench_shm(args) -> dict:
    from weightsync.transport.shm import ShmRing, ShmSender

    plan = build_plan(model_metas(args.total_mib), args.bucket_mib * MiB)
    named = make_tensors(model_metas(args.total_mib))
    a, b = CTX.Pipe()
    proc = CTX.Process(target=_shm_consumer, args=(b, args))
    proc.start()
    channel = PipeChannel(a, timeout_s=600)
    ring = ShmRing.create(plan.max_bucket_nbytes)
    channel.put(SetupMsg(ring.spec))
    channel.get()
    sender = ShmSender(ring)
    src = torch.ones(plan.total_nbytes, dtype=torch.uint8)  # all of it: not cache-resident
    dst = torch.zeros_like(src)
    spans = bucket_spans(plan)
    params = dict(make_tensors(model_metas(args.total_mib)))
    times = {"memcpy": [], "copies": [], "transport": []}
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        for lo, hi in spans:
            dst[lo:hi].copy_(src[lo:hi])
        times["memcpy"].append(time.perf_counter() - t0)
        times["copies"].append(local_copies(plan, named, params))
        t0 = time.perf_counter()
        send_stream(sender, plan, named, lambda b, t: channel.put(BucketMsg(b, t)))
        channel.put(DoneMsg(len(plan.buckets)))
        channel.get()  # the consumer has loaded everything
        times["transport"].append(time.perf_counter() - t0)
    proc.join(timeout=60)
    sender.close()
    return {k: v[1:] for k, v in times.items()} | {"nbytes": plan.total_nbytes}


def bench_disk(args) -> dict:
    from weightsync.transport.disk import DiskStore

    plan = build_plan(model_metas(args.total_mib), args.bucket_mib * MiB)
    named = make_tensors(model_metas(args.total_mib))
    times = {"write": [], "read": []}
    with tempfile.TemporaryDirectory(dir=args.disk_dir) as root:
        store = DiskStore(Path(root), keep_last=1)
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            with store.begin(f"v{i}") as writer:
                send_stream(writer, plan, named, lambda b, t: None)
                writer.commit()
            times["write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in store.read(f"v{i}"):
                pass
            times["read"].append(time.perf_counter() - t0)
    return {k: v[1:] for k, v in times.items()} | {"nbytes": plan.total_nbytes}


def _have_sglang() -> bool:
    try:
        import sglang.srt.utils  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda_consumer(conn, args, safe):
    setup(args)
    from weightsync.transport.ipc import IpcPayloadReceiver

    channel = PipeChannel(conn, timeout_s=600)
    receiver = IpcPayloadReceiver(device="cuda", safe=safe)
    params = dict(make_tensors(model_metas(args.total_mib), "cuda"))
    plan = build_plan(model_metas(args.total_mib), args.bucket_mib * MiB)
    for _ in range(args.repeats + 1):
        for msg in iter(channel.get, DoneMsg(len(plan.buckets))):
            for name, t in unpack_bucket(msg.bucket, receiver.recv(msg.bucket, msg.ticket)):
                params[name].copy_(t)
            torch.cuda.synchronize()
            receiver.release(msg.ticket)
            channel.put(AckMsg(msg.ticket))


def bench_cuda(args) -> dict:
    from weightsync.transport.ipc import IpcPayloadSender

    plan = build_plan(model_metas(args.total_mib), args.bucket_mib * MiB)
    named = make_tensors(model_metas(args.total_mib), "cuda")
    with_sglang = _have_sglang()  # else plain pickle, same GPU numbering on both sides
    print(f"CUDA IPC payloads {'with' if with_sglang else 'without'} sglang's (un)pickling")
    a, b = CTX.Pipe()
    proc = CTX.Process(target=_cuda_consumer, args=(b, args, with_sglang))
    proc.start()
    channel = PipeChannel(a, timeout_s=600)
    sender = IpcPayloadSender("cuda", uuid_devices=with_sglang)
    src = torch.ones(plan.total_nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.zeros_like(src)
    spans = bucket_spans(plan)
    params = dict(make_tensors(model_metas(args.total_mib), "cuda"))

    def ship(bucket, ticket):
        channel.put(BucketMsg(bucket, ticket))
        sender.acknowledge(channel.get().ticket)

    times = {"d2d_copy": [], "copies": [], "transport": []}
    for _ in range(args.repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for lo, hi in spans:
            dst[lo:hi].copy_(src[lo:hi])
        torch.cuda.synchronize()
        times["d2d_copy"].append(time.perf_counter() - t0)
        times["copies"].append(local_copies(plan, named, params, "cuda"))
        t0 = time.perf_counter()
        send_stream(sender, plan, named, ship)
        times["transport"].append(time.perf_counter() - t0)
        channel.put(DoneMsg(len(plan.buckets)))
    proc.join(timeout=60)
    return {k: v[1:] for k, v in times.items()} | {"nbytes": plan.total_nbytes}


def report(title: str, res: dict, ours: str = "transport") -> None:
    n = res["nbytes"]
    print(f"\n{title}: {n / MiB:.0f} MiB")
    for key in [k for k in res if k not in ("nbytes", ours)] + [ours]:
        t, rate = median_rate(res[key], n)
        runs = ", ".join(f"{x * 1e3:.0f}" for x in res[key])
        print(f"  {key:>10}: median {t * 1e3:8.1f} ms  {rate:6.2f} GiB/s  (runs ms: {runs})")
    for key in [k for k in res if k not in ("nbytes", ours)]:
        ratio = statistics.median(res[key]) / statistics.median(res[ours])
        print(f"  throughput ratio {ours}/{key}: {ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total-mib", type=int, default=512)
    ap.add_argument("--bucket-mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--disk-dir", default=None, help="parent of the disk benchmark's root")
    ap.add_argument("--cuda", action="store_true", help="only the CUDA IPC benchmark")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process")
    args = ap.parse_args()
    setup(args)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.total_mib} MiB in {args.bucket_mib} MiB buckets, median of {args.repeats}"
    )
    if args.cuda:
        report("CUDA IPC payloads (2 processes, 1 GPU)", bench_cuda(args))
        return
    report("broadcast (gloo, 2 processes)", bench_broadcast(args))
    report("shm ring (fill + consumer copy-out)", bench_shm(args))
    disk = bench_disk(args)
    print(f"\ndisk ({args.disk_dir or tempfile.gettempdir()}): {disk['nbytes'] / MiB:.0f} MiB")
    for key, what in (("write", "write + fsync + commit"), ("read", "sha256 verify + read")):
        t, rate = median_rate(disk[key], disk["nbytes"])
        print(f"  {what:>22}: median {t * 1e3:8.1f} ms  {rate:6.2f} GiB/s")


if __name__ == "__main__":
    main()
