"""The two processes of one sync benchmark: a megatron trainer (source rank) and our receiver.

The trainer runs the real data path (``WeightSender.send``: export -> [int4] -> plan ->
transport) into a receiver process that loads every bucket into a preallocated state dict and
acknowledges it, like an engine does. Between the same two processes it also times the raw
primitive moving the same bytes in the same bucket sizes (gloo broadcast with two buffers in
flight; for shared memory, one ``copy_`` of the bytes), so the ratio isolates our overhead.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from benchmarks.channel import AckMsg, BucketMsg, DoneMsg, FailedMsg, PipeChannel, SetupMsg
from weightsync.config import MiB
from weightsync.net import free_port
from weightsync.plan import unpack_bucket
from weightsync.transport.base import Ticket

TIMEOUT_S = 600.0
GROUP = "bench"


@dataclass(frozen=True)
class ModelDims:
    label: str
    hidden: int
    layers: int
    vocab: int = 32000

    def hf_dict(self) -> dict:
        heads = max(1, self.hidden // 64)  # head_dim 64: the CPU engines' minimum
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=-(-self.hidden * 11 // 4 // 128) * 128,  # int4 groups of 128
            num_hidden_layers=self.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
            tie_word_embeddings=False,
            torch_dtype="bfloat16",
        )


@dataclass(frozen=True)
class Case:
    dims: ModelDims
    transports: tuple[str, ...]
    bucket_mibs: tuple[int, ...]
    int4_modes: tuple[bool, ...]
    repeats: int
    threads: int


class PipeEngine:
    """Our receiver process seen from ``WeightSender``: bucket metadata out, acks back."""

    name = "bench-receiver"

    def __init__(self, channel: PipeChannel) -> None:
        self.channel = channel

    def validate(self, plan, named_tensors=None) -> None:
        """The receiver allocates whatever the plan holds: nothing to refuse."""

    def update_bucket(self, bucket, ticket):
        self.channel.put(BucketMsg(bucket, ticket))
        return self

    def wait(self, timeout_s: float) -> None:
        self.channel.get(timeout_s)


def receiver_main(port: int, conn, threads: int) -> None:
    """Receive sessions until told to stop: ("broadcast",) / ("ipc", spec) / ("raw", sizes)."""
    torch.set_num_threads(threads)
    channel = PipeChannel(conn, timeout_s=TIMEOUT_S)
    try:
        from weightsync.transport.broadcast import BroadcastReceiver, init_weight_group

        group = init_weight_group("127.0.0.1", port, 2, 1, GROUP, "gloo", timeout_s=TIMEOUT_S)
        params: dict[str, torch.Tensor] = {}  # the engine's weights, allocated on first sight
        while True:
            kind, *arg = channel.get().spec
            if kind == "stop":
                return
            if kind == "raw":
                _raw_broadcast(group, arg[0])
                channel.put(AckMsg(Ticket(-1)))
                continue
            if kind == "broadcast":
                receiver = BroadcastReceiver(group, timeout_s=TIMEOUT_S)
            else:
                from weightsync.transport.shm import ShmReceiver, ShmRing

                receiver = ShmReceiver(ShmRing.attach(arg[0], unlink=True))
            _load_session(channel, receiver, params)
    except BaseException:  # noqa: BLE001 - the traceback travels to the trainer
        channel.put(FailedMsg("bench receiver", traceback.format_exc()))


def _load_session(channel: PipeChannel, receiver, params: dict) -> None:
    while True:
        msg = channel.get()
        if isinstance(msg, DoneMsg):
            channel.put(AckMsg(Ticket(-1)))
            continue
        if isinstance(msg, SetupMsg):  # ("end",): the session's transport is released
            receiver.close()
            return
        for name, t in unpack_bucket(msg.bucket, receiver.recv(msg.bucket, msg.ticket)):
            if name not in params:
                params[name] = torch.empty_like(t)
            params[name].copy_(t)
        receiver.release(msg.ticket)
        channel.put(AckMsg(msg.ticket))


def _raw_broadcast(group, sizes: list[int]) -> None:
    """Both sides: the same byte counts, two persistent buffers, two broadcasts in flight."""
    bufs = [torch.ones(max(sizes), dtype=torch.uint8) for _ in range(2)]
    works = []
    for i, n in enumerate(sizes):
        if len(works) == 2:
            works.pop(0).wait()
        works.append(dist.broadcast(bufs[i % 2][:n], group_src=0, group=group, async_op=True))
    for w in works:
        w.wait()


def trainer_main(port: int, conn, case: Case, out) -> None:
    """Build the megatron model, then time every (transport, int4, bucket) combination."""
    torch.set_num_threads(case.threads)
    channel = PipeChannel(conn, timeout_s=TIMEOUT_S)
    try:
        out.put(("ok", _trainer(port, channel, case)))
    except BaseException:  # noqa: BLE001 - the traceback travels to the driver
        out.put(("error", traceback.format_exc()))
    finally:
        channel.put(SetupMsg(("stop",)))


def _trainer(port: int, channel: PipeChannel, case: Case) -> dict:
    from transformers import AutoConfig

    import megatron_bridge as mb
    from weightsync.transport.broadcast import init_weight_group

    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}"
    )
    mb.enable_cpu_megatron()
    mb.init_parallel(tp=1)
    hf = AutoConfig.for_model("llama", **case.dims.hf_dict())
    t0 = time.perf_counter()
    chunks = mb.build_model(hf, params_dtype=torch.bfloat16)
    build_s = time.perf_counter() - t0
    group = init_weight_group("127.0.0.1", port, 2, 0, GROUP, "gloo", timeout_s=TIMEOUT_S)
    params = sum(p.numel() for p in chunks[0].parameters())
    rows = [
        _one(channel, group, chunks, hf, case, transport, int4, mib)
        for transport in case.transports
        for int4 in case.int4_modes
        for mib in case.bucket_mibs
    ]
    return {"model": case.dims.label, "params": params, "build_s": build_s, "rows": rows}


def _one(channel, group, chunks, hf, case: Case, transport: str, int4: bool, mib: int) -> dict:
    from benchmarks.peak import PeakRss, rss_bytes
    from weightsync.config import SyncConfig
    from weightsync.quant import Int4Config
    from weightsync.sender import WeightSender

    cfg = SyncConfig(transport=transport, bucket_bytes=mib * MiB)
    ws = WeightSender(chunks, hf, cfg, Int4Config() if int4 else None)
    engine = PipeEngine(channel)
    t0 = time.perf_counter()
    plan = ws.prepare([engine])
    prepare_s = time.perf_counter() - t0
    sizes = [b.nbytes for b in plan.buckets]
    gc.collect()
    baseline = rss_bytes()
    sender, ring = _open(channel, group, transport, plan)
    sync, stages, peak = [], [], 0
    for i in range(case.repeats + 1):
        sampler = PeakRss().start() if i == 0 else None
        t0 = time.perf_counter()
        stats = ws.send([engine], sender)
        channel.put(DoneMsg(len(plan.buckets)))
        channel.get()
        sync.append(time.perf_counter() - t0)
        stages.append(stats)
        if sampler is not None:  # the cold round: staging first touched, the true extra peak
            peak = sampler.stop() - baseline
    channel.put(SetupMsg(("end",)))
    sender.close()
    if ring is not None:
        ring.close()
    raw = _raw(channel, group, transport, sizes, case.repeats)
    med = {k: statistics.median(getattr(s, k) for s in stages[1:]) for k in _STAGES}
    return {
        "transport": transport,
        "receiver": "weightsync receiver process (preallocated state dict)",
        "int4": int4,
        "bucket_mib": mib,
        "nbytes": plan.total_nbytes,
        "num_buckets": len(sizes),
        "max_bucket_bytes": plan.max_bucket_nbytes,
        "prepare_s": prepare_s,
        "sync_s": statistics.median(sync[1:]),
        "sync_runs_s": sync[1:],
        "raw_s": statistics.median(raw),
        "raw_runs_s": raw,
        "raw_what": "gloo broadcast, same buckets"
        if transport == "broadcast"
        else "memcpy, same bytes",
        "stages_s": med,
        "extra_peak_bytes": peak,
    }


_RAW_WHAT = {"broadcast": "gloo broadcast, same buckets", "ipc": "memcpy, same bytes"}
_STAGES = ("export_s", "quantize_s", "transfer_s", "engine_load_s")


def _open(channel, group, transport: str, plan):
    if transport == "broadcast":
        from weightsync.transport.broadcast import BroadcastSender

        channel.put(SetupMsg(("broadcast",)))
        return BroadcastSender(group, timeout_s=TIMEOUT_S), None
    from weightsync.transport.shm import ShmRing, ShmSender

    ring = ShmRing.create(plan.max_bucket_nbytes, num_slots=2, num_consumers=1)
    channel.put(SetupMsg(("ipc", ring.spec)))
    return ShmSender(ring, timeout_s=TIMEOUT_S), ring


def _raw(channel, group, transport: str, sizes: list[int], repeats: int) -> list[float]:
    times = []
    if transport == "broadcast":
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            channel.put(SetupMsg(("raw", sizes)))
            _raw_broadcast(group, sizes)
            channel.get()
            times.append(time.perf_counter() - t0)
        return times[1:]
    src = torch.ones(sum(sizes), dtype=torch.uint8)  # all of it: not cache-resident
    dst = torch.zeros_like(src)
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        lo = 0
        for n in sizes:
            dst[lo : lo + n].copy_(src[lo : lo + n])
            lo += n
        times.append(time.perf_counter() - t0)
    return times[1:]
