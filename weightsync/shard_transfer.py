"""The reshard plan's bytes on the wire: every trainer rank sends its own slices, every engine
rank receives exactly the slices it serves, point to point, every engine rank fed in each
round.

One process group holds the trainer ranks (group ranks 0..T-1, the trainer's global ranks) and
the engine ranks after them (``receiver_rank``). The moves are cut into rounds
(``plan_rounds``) that both sides derive from the same plan: in a round every sender posts all
its sends and every receiver all its receives before anyone waits, so no order of waits can
deadlock, and no endpoint holds more than ``bound_bytes`` in flight per round (one move larger
than the bound travels alone).

A receiver assembles, per tensor, only its own slice (``engine_box``): the pieces land at their
offsets inside it. int4 pieces are quantized by their sender and travel as codes, scales (and
zero points), each landing in the receiver's slice of that engine tensor. A piece that spans
the slice's trailing dims (a cut by rows) is received in place; others go through one
contiguous buffer (gloo mis-handles strided tensors).

Every message has tag 0: gloo pairs a (sender, receiver) pair's messages in posting order.
After a failed update the group is rebuilt (``WeightSync`` reconnects), so no stale message
can pair with a later update's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_bridge.meta import Box, box_numel
from weightsync.engine_shards import EngineLayout, ModelShape, engine_box
from weightsync.quant.config import Int4Config
from weightsync.quant.shards import Part, encode, packed_parts
from weightsync.reshard import Move, ReshardPlan
from weightsync.tensors import dtype_name


def receiver_rank(plan: ReshardPlan, trainer_world: int, engine: int, worker: int) -> int:
    """Group rank of an engine rank: after the trainer's ranks, engines in order."""
    before = sum(tp for e, tp in enumerate(plan.engine_tps) if e < engine)
    return trainer_world + before + worker


def plan_rounds(moves: Sequence[Move], bound_bytes: int) -> list[list[Move]]:
    """``moves`` cut into rounds that feed every engine rank at once: each round takes one move
    from every destination's queue (its moves in plan order) in turn, a queue dropping out
    when one more move would put more than ``bound_bytes`` on its sender or on it; a move
    larger than the bound goes alone from its endpoints. Per (sender, receiver) pair the plan
    order is kept, which is the order gloo pairs their messages in."""
    queues: dict[tuple[int, int], deque[Move]] = {}
    for m in moves:
        queues.setdefault((m.engine, m.worker), deque()).append(m)
    rounds: list[list[Move]] = []
    while queues:
        load: dict[tuple, int] = {}
        taken: list[Move] = []
        open_ = list(queues)
        while open_:  # one move per destination in turn, so all of them share the senders
            for dst in list(open_):
                queue = queues[dst]
                m = queue[0] if queue else None
                ends = (("src", m.src), ("dst", *dst)) if m else ()
                if m is None or not all(_fits(load.get(x, 0), m.nbytes, bound_bytes) for x in ends):
                    open_.remove(dst)  # full or empty: the rest waits for the next round
                    continue
                taken.append(queue.popleft())
                for x in ends:
                    load[x] = load.get(x, 0) + m.nbytes
        queues = {d: q for d, q in queues.items() if q}
        rounds.append(taken)
    return rounds


def _fits(held: int, nbytes: int, bound: int) -> bool:
    return held == 0 or held + nbytes <= bound  # an endpoint's first move always goes


@dataclass(frozen=True)
class Tensors:
    """What both sides know of the exported tensors: shapes, dtypes, and the int4 config."""

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, torch.dtype]
    int4: Int4Config | None = None

    def parts(self, name: str, box: Box) -> list[Part]:
        return packed_parts(name, self.shapes[name], box, self.dtypes[name], self.int4)

    def worker_slices(
        self, layout: EngineLayout, model: ModelShape, worker: int
    ) -> dict[str, tuple[Box, torch.dtype]]:
        """Every engine tensor part this engine rank serves: {name: (its box, dtype)}."""
        out = {}
        for name, shape in self.shapes.items():
            box = engine_box(name, shape, layout, model, worker)
            if box is not None:
                out.update((n, (b, dt)) for n, b, dt in self.parts(name, box))
        return out


def send_slices(
    plan: ReshardPlan,
    rank: int,
    read: Callable[[str, Box], torch.Tensor],
    tensors: Tensors,
    group: dist.ProcessGroup,
    trainer_world: int,
    bound_bytes: int,
) -> int:
    """Send this trainer rank's moves, ``read(name, box)`` giving each slice from the local
    shard (quantized here when int4). Returns the bytes sent. Collective over ``group`` with
    ``receive_slices``."""
    sent = 0
    for moves in plan_rounds(plan.moves, bound_bytes):
        work, keep = [], []
        for m in moves:
            if m.src != rank:
                continue
            dst = receiver_rank(plan, trainer_world, m.engine, m.worker)
            parts = tensors.parts(m.name, m.box)
            for t, (name, box, dtype) in zip(
                encode(m.name, read(m.name, m.box), tensors.int4), parts, strict=True
            ):
                if t.dtype != dtype or tuple(t.shape) != _extent(box):  # gloo counts bytes only
                    raise ValueError(
                        f"{name}: sending {t.dtype} {tuple(t.shape)}, planned {dtype} "
                        f"{_extent(box)}"
                    )
                t = t.contiguous()
                keep.append(t)
                work.append(dist.isend(t, group=group, group_dst=dst))
                sent += t.numel() * t.element_size()
        for w in work:
            w.wait()
    return sent


def receive_slices(
    plan: ReshardPlan,
    engine: int,
    worker: int,
    slices: Mapping[str, tuple[Box, torch.dtype]],
    tensors: Tensors,
    group: dist.ProcessGroup,
    bound_bytes: int,
) -> dict[str, torch.Tensor]:
    """This engine rank's part of every tensor in ``slices`` (``Tensors.worker_slices``),
    assembled from the moves addressed to it. Collective with ``send_slices``."""
    out = {n: torch.empty(_extent(box), dtype=dt) for n, (box, dt) in slices.items()}
    for moves in plan_rounds(plan.moves, bound_bytes):
        work, landing = [], []
        for m in moves:
            if (m.engine, m.worker) != (engine, worker):
                continue
            for name, box, _ in tensors.parts(m.name, m.box):
                view = _view(out[name], slices[name][0], box)
                buf = view if view.is_contiguous() else torch.empty_like(view)
                work.append(dist.irecv(buf, group=group, group_src=m.src))
                landing.append((view, buf))
        for w in work:
            w.wait()
        for view, buf in landing:
            if buf is not view:
                view.copy_(buf)
    return out


def _extent(box: Box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def _view(whole: torch.Tensor, outer: Box, inner: Box) -> torch.Tensor:
    """``inner`` (HF coordinates) as a view of ``whole``, which holds ``outer``."""
    for dim, ((o0, _), (i0, i1)) in enumerate(zip(outer, inner, strict=True)):
        whole = whole.narrow(dim, i0 - o0, i1 - i0)
    return whole


def engine_rounds(plan: ReshardPlan, tensors: Tensors, engine: int, bound_bytes: int) -> list[dict]:
    """What one engine must be told per round (the ``/update_weights`` JSON of the sharded
    transport, ``vllm_plugin.shards``): the pieces to receive ([sender, worker, tensor, box,
    whole shape, dtype]); the tensors each worker can load once the round's pieces are in
    ([worker, tensor, elements it receives, whole shape, dtype]; a tensor it serves none of is
    loaded as zeros in the first round); the int4 weight shapes beside their codes. Rounds
    with nothing for this engine are left out. The caller sends round k to every engine
    before round k + 1 to any (one ordered queue per engine does)."""
    rounds = plan_rounds(plan.moves, bound_bytes)
    last: dict[tuple[int, str], int] = {}
    served: dict[tuple[int, str], int] = {}  # elements each worker receives of each tensor
    for k, moves in enumerate(rounds):
        for m in moves:
            if m.engine == engine:
                for name, box, _ in tensors.parts(m.name, m.box):
                    last[(m.worker, name)] = k
                    served[(m.worker, name)] = served.get((m.worker, name), 0) + box_numel(box)
    out = []
    for k, moves in enumerate(rounds):
        mine = [m for m in moves if m.engine == engine]
        if not mine:
            continue  # nothing for this engine: no call
        pieces = [
            [
                m.src,
                m.worker,
                name,
                [list(b) for b in box],
                list(_whole_shape(tensors, name)),
                dtype_name(dtype),
            ]
            for m in mine
            for name, box, dtype in tensors.parts(m.name, m.box)
        ]
        ready = [(w, n, served[(w, n)]) for (w, n), at in last.items() if at == k]
        out.append({"bucket": k, "pieces": pieces, "ready": ready})
    if out:
        # Tensors a worker serves no element of (vocabulary rows past its block) are loaded
        # all the same, as zeros its loaders cut nothing from: vLLM reloads whole layers.
        workers = range(plan.engine_tps[engine])
        every = [
            p for name, shape in tensors.shapes.items() for p in tensors.parts(name, _all(shape))
        ]
        out[0]["ready"] += [(w, n, 0) for w in workers for n, _, _ in every if (w, n) not in served]
    dtypes = {
        n: dt for name, s in tensors.shapes.items() for n, _, dt in tensors.parts(name, _all(s))
    }
    for entry in out:
        entry["ready"], entry["constants"] = _ready(tensors, dtypes, entry["ready"])
    return out


def _all(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


def _ready(
    tensors: Tensors, dtypes: Mapping[str, torch.dtype], ready: list[tuple[int, str, int]]
) -> tuple[list, list]:
    """``ready`` as sent ([worker, tensor, elements received, whole shape, dtype]), and the
    int4 weight shapes that go with packed codes (no slice carries the whole weight's)."""
    entries = [
        [w, n, k, list(_whole_shape(tensors, n)), dtype_name(dtypes[n])] for w, n, k in ready
    ]
    constants = [
        [w, n.removesuffix("_packed") + "_shape", list(tensors.shapes[n.removesuffix("_packed")])]
        for w, n, _ in ready
        if n.endswith(".weight_packed")
    ]
    return entries, constants


def _whole_shape(tensors: Tensors, part: str) -> tuple[int, ...]:
    """The whole engine tensor's shape of ``part`` (an HF tensor, or one of its int4 parts)."""
    if part in tensors.shapes:
        return tensors.shapes[part]
    base, _, leaf = part.rpartition(".")
    name = f"{base}.weight"
    whole = ((0, s) for s in tensors.shapes[name])
    for p, box, _ in packed_parts(
        name, tensors.shapes[name], tuple(whole), torch.uint8, tensors.int4
    ):
        if p == part:
            return _extent(box)
    raise ValueError(f"{part}: not a tensor of this model ({leaf})")
