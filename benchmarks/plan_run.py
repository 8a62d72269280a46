"""Real bytes over gloo on this host: the constants of ``benchmarks.scale_model`` and a plan run.

One spawned gloo job (trainer ranks first, then the engine workers). First ``p2p``: ping-pong
between ranks 0 and 1 (N bytes out, 1 byte back) at a few sizes. Then rounds in which these
take turns (the order rotated each round, so that the other jobs on this host weigh on all alike):
- ``null``     a round's two barriers and nothing else (subtracted from the others);
- ``link``     rank 0 sends ``LINK_BYTES`` to rank 1: one rank's link;
- ``host``     the first half of the ranks each sending ``LINK_BYTES`` to one of the second half
               at once: what the processes together move through the host's shared cores;
- ``burst``    ``BURST`` small messages 0 -> 1 posted at once: the cost of one more message;
- ``sharded``  every trainer rank isends its moves of the plan, every worker irecvs its own;
- ``gathered`` today's path: the other trainer ranks send rank 0 what it lacks while rank 0
               broadcasts the model bucket by bucket to the workers (2 buckets in flight),
               each bucket once its gathered pieces are in.
Payloads are uint8 views of one random buffer per rank (no copies in the timed part). Rank 0's
clock, barrier to barrier; medians over ``repeats`` rounds after one warm-up round.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from weightsync.net import free_port

LINK_BYTES = 64 << 20
BURST = (512, 4 << 10)
"""Messages and bytes of each in the burst."""


@dataclass(frozen=True)
class Job:
    trainers: int
    workers: int
    moves: tuple[tuple[int, int, int], ...]
    """Sharded: (trainer rank, worker's global rank, bytes), in plan order."""
    pieces: tuple[tuple[int, int], ...]
    """Gathered: (holder rank, bytes) of every piece of the model, in model order."""
    bucket: int
    sizes: tuple[int, ...]
    repeats: int
    out: str

    @property
    def world(self) -> int:
        return self.trainers + self.workers


def run(job: Job) -> dict:
    """Spawn the job's ranks; rank 0's {p2p: {bytes: s}, medians: {mode: s}, runs: {mode: [s]}}."""
    mp.spawn(_worker, args=(job, free_port()), nprocs=job.world, join=True)
    return json.loads(Path(job.out).read_text())


def _worker(rank: int, job: Job, port: int) -> None:
    # One intra-op thread each: the ranks share two cores, and gloo does its own copying.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=job.world
    )
    bcast = dist.new_group([0, *range(job.trainers, job.world)])
    p2p = _p2p(rank, job)
    modes = {
        "null": lambda: None,
        "link": _pairs(rank, 1),
        "host": _pairs(rank, job.world // 2),
        "burst": _burst(rank),
        "sharded": _sharded(rank, job),
        "gathered": _gathered(rank, job, bcast),
    }
    names = list(modes)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(job.repeats + 1):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            t = _once(modes[name])
            if rep:  # the first round warms everything up
                runs[name].append(t)
    medians = {name: statistics.median(ts) for name, ts in runs.items()}
    if rank == 0:
        Path(job.out).write_text(json.dumps({"p2p": p2p, "medians": medians, "runs": runs}))
    dist.barrier()
    dist.destroy_process_group()


def _once(fn: Callable[[], None]) -> float:
    dist.barrier()
    t = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t


def _p2p(rank: int, job: Job) -> dict[int, float]:
    out = {}
    ack = torch.zeros(1, dtype=torch.uint8)
    for size in job.sizes:
        buf = torch.zeros(size, dtype=torch.uint8)
        times = []
        for _ in range(job.repeats + 1):
            dist.barrier()
            t = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(ack, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(ack, 0)
            times.append(time.perf_counter() - t)
        out[size] = statistics.median(times[1:])
    return out


def _pairs(rank: int, pairs: int) -> Callable[[], None]:
    """Rank i < ``pairs`` sends ``LINK_BYTES`` to rank i + ``pairs``, all at once."""
    sender, receiver = rank < pairs, pairs <= rank < 2 * pairs
    buf = _random(LINK_BYTES) if sender else torch.empty(LINK_BYTES * receiver, dtype=torch.uint8)

    def go() -> None:
        if sender:
            dist.send(buf, rank + pairs)
        elif receiver:
            dist.recv(buf, rank - pairs)

    return go


def _burst(rank: int) -> Callable[[], None]:
    n, size = BURST
    views = _views(_random(n * size), [size] * n)

    def go() -> None:
        if rank > 1:
            return
        op = dist.isend if rank == 0 else dist.irecv
        for w in [op(v, 1 - rank) for v in views]:
            w.wait()

    return go


def _views(buf: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, at = [], 0
    for n in sizes:
        out.append(buf[at : at + n])  # 1-D slices: contiguous, as gloo needs
        at += n
    return out


def _random(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8)


def _sharded(rank: int, job: Job) -> Callable[[], None]:
    outs = [(dst, n) for src, dst, n in job.moves if src == rank]
    ins = [(src, n) for src, dst, n in job.moves if dst == rank]
    send = _views(_random(sum(n for _, n in outs)), [n for _, n in outs])
    recv = _views(torch.empty(sum(n for _, n in ins), dtype=torch.uint8), [n for _, n in ins])

    def go() -> None:
        works = [dist.isend(v, dst) for (dst, _), v in zip(outs, send, strict=True)]
        works += [dist.irecv(v, src) for (src, _), v in zip(ins, recv, strict=True)]
        for w in works:
            w.wait()

    return go


def buckets(pieces: Sequence[tuple[int, int]], cap: int) -> list[tuple[int, int]]:
    """[first piece, end piece) of each bucket: (holder, bytes) pieces packed in order up to
    ``cap`` bytes (a larger piece alone)."""
    out, first, size = [], 0, 0
    for i, (_, n) in enumerate(pieces):
        if size and size + n > cap:
            out.append((first, i))
            first, size = i, 0
        size += n
    return [*out, (first, len(pieces))]


def _gathered(rank: int, job: Job, bcast: dist.ProcessGroup) -> Callable[[], None]:
    sizes = [n for _, n in job.pieces]
    model = (
        _random(sum(sizes)) if rank < job.trainers else torch.empty(sum(sizes), dtype=torch.uint8)
    )
    views = _views(model, sizes)
    spans = buckets(job.pieces, job.bucket)
    starts = [sum(sizes[:a]) for a, _ in spans] + [len(model)]
    chunks = [model[s:e] for s, e in itertools.pairwise(starts)]

    def root() -> None:
        recvs = [
            [dist.irecv(views[i], job.pieces[i][0]) for i in range(a, b) if job.pieces[i][0]]
            for a, b in spans
        ]
        inflight: list[dist.Work] = []
        for bucket, pending in zip(chunks, recvs, strict=True):
            for w in pending:
                w.wait()
            inflight.append(dist.broadcast(bucket, 0, group=bcast, async_op=True))
            if len(inflight) > 2:
                inflight.pop(0).wait()
        for w in inflight:
            w.wait()

    def holder() -> None:
        mine = [v for (h, _), v in zip(job.pieces, views, strict=True) if h == rank]
        for w in [dist.isend(v, 0) for v in mine]:
            w.wait()

    def worker() -> None:
        for w in [dist.broadcast(b, 0, group=bcast, async_op=True) for b in chunks]:
            w.wait()

    return root if rank == 0 else holder if rank < job.trainers else worker
