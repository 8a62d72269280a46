"""The processes of ``benchmarks.shard_sync``: megatron trainer ranks and one receiving process
per engine rank, in one spawned job, timing today's gathered path against the sharded one.

Three process groups:
- the trainer's own (gloo, ranks 0..T-1): megatron's TP collectives of the gathered export;
- ``shards`` (every process; trainer ranks first, then the engine ranks in order,
  ``weightsync.shard_transfer.receiver_rank``): the sharded transfer, and the barriers that
  bracket every timed round;
- ``gathered`` (trainer rank 0 + the engine ranks): weightsync's broadcast transport.

Gathered round: every trainer rank runs ``export_hf_weights`` (TP gathers onto rank 0); rank 0
[int4-packs the full tensors and] streams them through ``BroadcastSender`` in the buckets of
``build_plan`` (``send_stream``, two buckets in flight); every engine rank receives every bucket
(``BroadcastReceiver``, the next one posted before this one is loaded) and keeps only its
``engine_box`` slice of each tensor. Sharded round: ``send_slices`` on every trainer rank,
``receive_slices`` on every engine rank. Both start from the same live parameters.
"""

from __future__ import annotations

import io
import os
import pickle
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.procs import ModelDims

ADDR = "127.0.0.1"
TIMEOUT_S = 600.0
KINDS = ("gathered", "sharded")


@dataclass(frozen=True)
class Job:
    dims: ModelDims
    trainer_tp: int
    engine_tp: int
    engines: int
    repeats: int
    int4: bool
    bucket_bytes: int
    """Gathered path: ``build_plan``'s bucket size."""
    bound_bytes: int
    """Sharded path: ``send_slices`` / ``receive_slices`` bytes in flight per endpoint."""
    ports: tuple[int, int, int]
    """Trainer default group, ``shards`` group, ``gathered`` group."""

    @property
    def world(self) -> int:
        """Trainer ranks (data parallel 1)."""
        return self.trainer_tp

    @property
    def receivers(self) -> int:
        return self.engines * self.engine_tp

    @property
    def total(self) -> int:
        return self.world + self.receivers


@dataclass(frozen=True)
class Derived:
    """What every process computes from the configs alone: the same plan everywhere."""

    cfg: Any
    sizes: Any
    layouts: list
    model: Any
    plan: Any
    tensors: Any
    int4: Any


def derive(job: Job) -> Derived:
    """The HF config, the trainer's holdings and the reshard plan. Raises ValueError where the
    plan refuses (e.g. int4 slices off group boundaries)."""
    from transformers import AutoConfig

    from megatron_bridge.holdings import ParallelSizes, plan_holdings
    from weightsync.engine_shards import EngineLayout, ModelShape
    from weightsync.quant.config import Int4Config
    from weightsync.reshard import plan_reshard
    from weightsync.shard_transfer import Tensors

    cfg = AutoConfig.for_model("llama", **job.dims.hf_dict())
    sizes = ParallelSizes(world=job.world, tp=job.trainer_tp, etp=job.trainer_tp)
    holdings = plan_holdings(cfg, sizes)
    itemsize = {h.name: 2 for h in holdings}  # bf16 model
    layouts = [EngineLayout(job.engine_tp) for _ in range(job.engines)]
    model = ModelShape.of(cfg)
    int4 = Int4Config(group_size=128) if job.int4 else None
    plan = plan_reshard(holdings, itemsize, layouts, model, int4)
    shapes = {h.name: h.shape for h in holdings}
    tensors = Tensors(shapes, dict.fromkeys(shapes, torch.bfloat16), int4)
    return Derived(cfg, sizes, layouts, model, plan, tensors, int4)


def root_copies(group_size: int) -> int:
    """Copies of each bucket the root sends in gloo's broadcast (``gloo::broadcast``: a
    binomial tree, the root sends once per round, ceil(log2(size)) rounds)."""
    return max(0, (group_size - 1).bit_length())


def _orders(repeats: int) -> list[tuple[str, str]]:
    """Round 0 is the warm-up; the order alternates so neither path always goes first."""
    return [KINDS if i % 2 == 0 else KINDS[::-1] for i in range(repeats + 1)]


def _share(obj: Any, group: dist.ProcessGroup, root: bool) -> Any:
    """Rank 0's ``obj`` to every rank of ``group`` (pickled over two broadcasts: the receivers
    have no default process group for ``broadcast_object_list``)."""
    if root:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        n = torch.tensor([data.numel()], dtype=torch.int64)
    else:
        n = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(n, group_src=0, group=group)
    if not root:
        data = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.broadcast(data, group_src=0, group=group)
    return obj if root else pickle.loads(data.numpy().tobytes())


def _groups(job: Job, rank: int, gathered_rank: int | None):
    from weightsync.transport.broadcast import init_weight_group

    shards = init_weight_group(ADDR, job.ports[1], job.total, rank, "shards", timeout_s=TIMEOUT_S)
    gathered = None
    if gathered_rank is not None:
        gathered = init_weight_group(
            ADDR, job.ports[2], 1 + job.receivers, gathered_rank, "gathered", timeout_s=TIMEOUT_S
        )
    return shards, gathered


def trainer(rank: int, job: Job) -> dict:
    import megatron_bridge as mb
    from megatron_bridge.holdings import live_holdings, plan_holdings, shard_reader
    from weightsync.plan import build_plan
    from weightsync.quant.stream import quantize_stream
    from weightsync.sender import plan_metas
    from weightsync.shard_transfer import send_slices
    from weightsync.transport.base import send_stream
    from weightsync.transport.broadcast import BroadcastSender

    os.environ.update(MASTER_ADDR=ADDR, MASTER_PORT=str(job.ports[0]))
    dist.init_process_group("gloo", rank=rank, world_size=job.world)
    mb.enable_cpu_megatron()
    mb.init_parallel(tp=job.trainer_tp)
    d = derive(job)
    t0 = time.perf_counter()
    chunks = mb.build_model(d.cfg, params_dtype=torch.bfloat16)
    build_s = time.perf_counter() - t0
    live = live_holdings(chunks, d.cfg)
    if live != plan_holdings(d.cfg, d.sizes):
        raise RuntimeError(f"rank {rank}: the live holdings differ from the configs-only plan")
    read = shard_reader(chunks, d.cfg, live)
    metas = mb.hf_weight_metadata(chunks, d.cfg)
    wrong = [
        (m.name, m.shape, m.dtype)
        for m in metas
        if m.dtype != torch.bfloat16 or tuple(m.shape) != d.tensors.shapes.get(m.name)
    ]
    if wrong or len(metas) != len(d.tensors.shapes):
        raise RuntimeError(
            f"rank {rank}: the export ({len(metas)} tensors) differs from the plan's "
            f"{len(d.tensors.shapes)} bf16 tensors: {wrong[:5]}"
        )
    gplan = build_plan(plan_metas(metas, d.int4), job.bucket_bytes)
    shards, gathered = _groups(job, rank, 0 if rank == 0 else None)
    sender = None
    if rank == 0:
        _share(gplan, gathered, root=True)
        sender = BroadcastSender(gathered, timeout_s=TIMEOUT_S)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for i, order in enumerate(_orders(job.repeats)):
        for kind in order:
            dist.barrier(group=shards)
            t0 = time.perf_counter()
            if kind == "sharded":
                sent = send_slices(
                    d.plan, rank, read, d.tensors, shards, job.world, job.bound_bytes
                )
            elif rank == 0:
                named = quantize_stream(mb.export_hf_weights(chunks, d.cfg), d.int4)
                send_stream(sender, gplan, named, lambda bucket, ticket: None)
            else:
                for _ in mb.export_hf_weights(chunks, d.cfg):  # collective: TP gathers to 0
                    pass
            dist.barrier(group=shards)
            times[kind].append(time.perf_counter() - t0)
            if i == 0 and kind == "sharded" and sent != d.plan.sent.get(rank, 0):
                raise RuntimeError(f"rank {rank} sent {sent} bytes, the plan says {d.plan.sent}")
        if i == 0:
            dist.barrier(group=shards)  # the receivers compared the two results
    if sender is not None:
        sender.close()
    return {
        "times": times,
        "build_s": build_s,
        "gathered_bytes": gplan.total_nbytes,
        "buckets": len(gplan.buckets),
        "params": sum(p.numel() for c in chunks for p in c.parameters()),
    }


def receiver(rank: int, job: Job) -> dict:
    from weightsync.shard_transfer import receive_slices
    from weightsync.transport.broadcast import BroadcastReceiver

    d = derive(job)
    index = rank - job.world
    engine, worker = divmod(index, job.engine_tp)
    slices = d.tensors.worker_slices(d.layouts[engine], d.model, worker)
    shards, gathered = _groups(job, rank, 1 + index)
    gplan = _share(None, gathered, root=False)
    bcast = BroadcastReceiver(gathered, timeout_s=TIMEOUT_S)
    received: dict[str, list[int]] = {k: [] for k in KINDS}
    held: dict[str, list[int]] = {k: [] for k in KINDS}
    for i, order in enumerate(_orders(job.repeats)):
        first: dict[str, dict[str, torch.Tensor]] = {}
        for kind in order:
            dist.barrier(group=shards)
            if kind == "sharded":
                got = receive_slices(
                    d.plan, engine, worker, slices, d.tensors, shards, job.bound_bytes
                )
                n = d.plan.received.get((engine, worker), 0)
            else:
                got, n = _receive_gathered(bcast, gplan, slices)
            dist.barrier(group=shards)
            received[kind].append(n)
            held[kind].append(sum(t.numel() * t.element_size() for t in got.values()))
            if i == 0:
                first[kind] = got
        if i == 0:
            _compare(first, slices, engine, worker)
            dist.barrier(group=shards)
    bcast.close()
    served = d.plan.served[(engine, worker)]
    wrong = {k: v for k, v in held.items() if any(x != served for x in v)}
    if wrong:
        raise RuntimeError(f"engine {engine} rank {worker} holds {wrong} bytes, serves {served}")
    return {"engine": engine, "worker": worker, "received": received, "served": served}


def _receive_gathered(bcast, gplan, slices) -> tuple[dict[str, torch.Tensor], int]:
    """Every bucket of the whole model; only this engine rank's slice of each tensor kept."""
    from weightsync.plan import unpack_bucket
    from weightsync.transport.base import Ticket

    out = {n: torch.empty([hi - lo for lo, hi in box], dtype=dt) for n, (box, dt) in slices.items()}
    seen, nbytes = set(), 0
    for b, bucket in enumerate(gplan.buckets):
        following = gplan.buckets[b + 1] if b + 1 < len(gplan.buckets) else None
        ticket = Ticket(bucket.index, next_nbytes=following.nbytes if following else 0)
        for name, t in unpack_bucket(bucket, bcast.recv(bucket, ticket)):
            if name in slices:
                out[name].copy_(t[tuple(slice(lo, hi) for lo, hi in slices[name][0])])
                seen.add(name)
        bcast.release(ticket)
        nbytes += bucket.nbytes
    missing = sorted(set(slices) - seen)
    if missing:
        raise RuntimeError(f"the gathered stream lacks {missing[:5]} ({len(missing)} tensors)")
    return out, nbytes


def _compare(first: dict, slices: dict, engine: int, worker: int) -> None:
    """The gathered and the sharded result of the first round: every slice bit-identical."""
    g, s = first["gathered"], first["sharded"]
    if set(g) != set(s) or set(g) != set(slices):
        raise RuntimeError(
            f"engine {engine} rank {worker}: tensor sets differ: gathered-only "
            f"{sorted(set(g) - set(s))[:5]}, sharded-only {sorted(set(s) - set(g))[:5]}"
        )
    differ = [
        (n, tuple(g[n].shape), tuple(s[n].shape))
        for n in sorted(g)
        if g[n].dtype != s[n].dtype or not torch.equal(g[n], s[n])
    ]
    if differ:
        raise RuntimeError(
            f"engine {engine} rank {worker}: the sharded slices differ from the gathered ones "
            f"in {len(differ)} of {len(g)} tensors: {differ[:5]}"
        )


def run(rank: int, job: Job, results) -> None:
    torch.set_num_threads(1)
    try:
        body = trainer if rank < job.world else receiver
        buf = io.BytesIO()
        torch.save(body(rank, job), buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the traceback travels to the driver
        results.put((rank, "error", traceback.format_exc()))
